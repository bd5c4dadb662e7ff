"""Fused codebook assignment / accumulation against the references (CPU: Triton interpreter)."""

from __future__ import annotations

import pytest
import torch

from bench import sm90
from spidr_fast import kernels
from spidr_fast.kernels.codebook import (
    codebook_accumulate_ref,
    codebook_assign_accumulate,
    codebook_assign_ref,
    codebook_ema_update_,
)
from tests.kernels.utils import max_diff

LOW = (torch.bfloat16, torch.float16)

# (C, N, K, D): N = 0 and 1, N not a multiple of the 64-frame block, D = 59 (not a power of two),
# K not a multiple of the codeword tile, K = 1, K > 256 (two codeword tiles: the running argmin).
# Plus the grid points: N in (1000, 4097), K in (16, 100, 256), D in (64, 100, 768), the
# realistic K = 256, D = 768 among them.
SHAPES = [
    (1, 0, 16, 64),
    (2, 1, 16, 64),
    (2, 100, 100, 59),
    (1, 70, 300, 40),
    (3, 65, 1, 16),
    (1, 1000, 256, 768),
    (1, 4097, 100, 100),
    (2, 1000, 16, 64),
]


def make_codebook(C: int, N: int, K: int, D: int, dtype: torch.dtype, device: str):
    x = torch.randn(C, N, D, device=device).to(dtype)
    counts = torch.rand(C, K, device=device) * 3 + 0.5
    codebook = torch.randn(C, K, D, device=device) * counts.unsqueeze(-1)  # codewords ~ N(0, 1), like x
    return x, codebook, counts


def distances(x: torch.Tensor, codebook: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(C, N, K) fp64 Euclidean distances to the fp32 codewords (the ones both implementations use)."""
    centers = (codebook / counts.unsqueeze(-1)).double()
    return torch.cdist(x.double(), centers)


def assert_labels_near_best(x, codebook, counts, labels, tol: float = 1e-3) -> None:
    """Judge labels by distance, not index: d(x, c[label]) <= min_k d(x, c_k) + tol."""
    assert labels.shape == x.shape[:2] and labels.dtype == torch.int64
    if labels.numel() == 0:
        return
    d = distances(x, codebook, counts)
    got = d.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    best = d.min(-1).values
    print(f"labels: {(labels != d.argmin(-1)).sum().item()} of {labels.numel()} differ from the fp64 argmin")
    assert (got <= best + tol).all(), f"max excess distance {(got - best).max().item():.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
@pytest.mark.parametrize("shape", SHAPES)
def test_assign(triton_backend, shape, dtype):
    if dtype != torch.float32 and shape[1] < 2:
        pytest.skip("edge sizes run in fp32 only")
    x, codebook, counts = make_codebook(*shape, dtype, triton_backend)
    labels = kernels.codebook_assign(x, codebook, counts)
    assert_labels_near_best(x, codebook, counts, labels)
    ref = codebook_assign_ref(x, codebook, counts)
    assert_labels_near_best(x, codebook, counts, ref)  # the reference obeys the same rule


@pytest.mark.parametrize("precision", ["ieee", "tf32x3"])
def test_assign_ties_go_to_the_lowest_index(triton_backend, precision):
    """Duplicate codewords (within a tile and across the codeword tiles of K = 300: 256-wide in IEEE,
    128-wide with tf32x3; the interpreter runs both in exact fp32, so this tests the tiling)."""
    C, N, K, D = 2, 40, 300, 24
    x, codebook, counts = make_codebook(C, N, K, D, torch.float32, triton_backend)
    dup = {3: 7, 10: 290, 100: 260}  # original -> duplicate with a higher index
    for src, dst in dup.items():
        codebook[:, dst], counts[:, dst] = codebook[:, src], counts[:, src]
    centers = codebook / counts.unsqueeze(-1)
    srcs = torch.tensor(list(dup), device=triton_backend)
    x[:, : 3 * len(dup)] = centers[:, srcs.repeat(3)]  # frames sitting exactly on a duplicated codeword
    labels = kernels.codebook_assign(x, codebook, counts, precision=precision)
    assert torch.equal(labels[:, : 3 * len(dup)], srcs.repeat(3).expand(C, -1))
    assert_labels_near_best(x, codebook, counts, labels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_accumulate(triton_backend, shape, dtype):
    C, N, K, D = shape
    if K > 100 and dtype != torch.float32:
        pytest.skip("one program per codeword: slow under the interpreter; wide K runs in fp32 only")
    x, _, _ = make_codebook(C, N, K, D, dtype, triton_backend)
    labels = torch.randint(0, K, (C, N), device=triton_backend)
    counts, sums = kernels.codebook_accumulate(x, labels, K)
    ref_counts, ref_sums = codebook_accumulate_ref(x, labels, K)
    assert counts.dtype == sums.dtype == torch.float32
    assert torch.equal(counts, ref_counts)
    print(f"sums max diff {max_diff(sums, ref_sums):.3g}")
    torch.testing.assert_close(sums, ref_sums, atol=1e-5, rtol=1e-5)


def test_assign_accumulate_fused(triton_backend):
    x, codebook, counts = make_codebook(2, 150, 40, 59, torch.float32, triton_backend)
    labels, batch_counts, sums = codebook_assign_accumulate(x, codebook, counts)
    assert_labels_near_best(x, codebook, counts, labels)
    ref_counts, ref_sums = codebook_accumulate_ref(x, labels, 40)
    assert torch.equal(batch_counts, ref_counts)
    torch.testing.assert_close(sums, ref_sums, atol=1e-5, rtol=1e-5)
    assert batch_counts.sum().item() == 2 * 150


def test_deterministic(triton_backend):
    """Two runs are bitwise equal (no float atomics in the sums)."""
    x, codebook, counts = make_codebook(2, 300, 20, 33, torch.float32, triton_backend)
    first = codebook_assign_accumulate(x, codebook, counts)
    second = codebook_assign_accumulate(x, codebook, counts)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_reference_backend_is_the_reference(reference_backend):
    x, codebook, counts = make_codebook(2, 50, 16, 24, torch.float32, reference_backend)
    assert torch.equal(kernels.codebook_assign(x, codebook, counts), codebook_assign_ref(x, codebook, counts))


def test_ema_update_moves_only_assigned_codewords():
    C, K, D, decay = 2, 5, 3, 0.9
    codebook, counts = torch.randn(C, K, D), torch.rand(C, K) + 1
    batch_counts = torch.tensor([[0.0, 2, 0, 1, 4], [3, 0, 0, 0, 1]])
    batch_sums = torch.randn(C, K, D) * batch_counts.unsqueeze(-1)
    new_codebook, new_counts = codebook.clone(), counts.clone()
    codebook_ema_update_(new_codebook, new_counts, batch_counts, batch_sums, decay)
    hit = batch_counts != 0
    alpha = torch.tensor(decay, dtype=torch.float32)  # fp32 constants, as in the reference
    assert torch.equal(new_counts[~hit], counts[~hit]) and torch.equal(new_codebook[~hit], codebook[~hit])
    assert torch.equal(new_counts[hit], alpha * counts[hit] + (1 - alpha) * batch_counts[hit])
    assert torch.equal(new_codebook[hit], alpha * codebook[hit] + (1 - alpha) * batch_sums[hit])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
@pytest.mark.parametrize(
    "shape", [(8, 4097, 256, 768), (8, 40_000, 256, 768), (2, 1000, 100, 100), (1, 1000, 4096, 1024), (3, 97, 16, 64)]
)
def test_gpu_grid(triton_backend, shape, dtype):
    C, N, K, D = shape
    x, codebook, counts = make_codebook(C, N, K, D, dtype, triton_backend)
    labels, batch_counts, sums = codebook_assign_accumulate(x, codebook, counts)
    assert_labels_near_best(x, codebook, counts, labels)
    ref_counts, ref_sums = codebook_accumulate_ref(x, labels, K)
    assert torch.equal(batch_counts, ref_counts)
    torch.testing.assert_close(sums, ref_sums, atol=1e-4, rtol=1e-5)
    assert torch.equal(kernels.codebook_assign(x, codebook, counts), labels)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["tf32x3", "tf32"])
def test_gpu_reduced_precision_labels(triton_backend, precision):
    """The interpreter ignores input_precision: only a GPU tests the tensor-core variants."""
    x, codebook, counts = make_codebook(8, 20_000, 256, 768, torch.float32, triton_backend)
    labels = kernels.codebook_assign(x, codebook, counts, precision=precision)
    assert_labels_near_best(x, codebook, counts, labels, tol=1e-3 if precision == "tf32x3" else 2e-2)


# --------------------------------------------------------------------------------------------
# sm_90 compiler facts (no GPU needed): see bench/sm90.py, bench/results/sm90_static_analysis.md
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sm90_codebook():
    """Both kernels compiled for an H100 at the base shapes (C=8, N=40k, K=256, D=768), with the
    configurations their launchers pick: one child process for the module."""
    return sm90.base_shapes_or_skip("codebook")


@pytest.mark.parametrize("name", sm90.kernel_names("codebook"))
def test_sm90_no_spills(sm90_codebook, name):
    """No local-memory spills and registers well under 255. Before: a 64 x 256 tile with BLOCK_D=32
    and 8 warps took 255 registers + 24 B of stack (IEEE) and 255 + 64-88 B (tf32x3). Now IEEE runs 16
    warps (32 accumulators a thread; 128 registers is also the most a 512-thread program can have)
    and tf32x3 a 64 x 128 tile: 172-180 registers under triton 3.9, 202 (x fp32) / 204 (x bf16)
    under triton 3.6 (the GPU machines'), no spill under either: bound 224, as the bf16 heads."""
    sm90.assert_fits(name, sm90_codebook[name], max_regs=224 if "tf32x3" in name else 128)


@pytest.mark.parametrize("name", [n for n in sm90.kernel_names("codebook") if "assign" in n])
def test_sm90_assign_instruction_mix(sm90_codebook, name):
    """tf32x3 runs its dots on tensor cores (HGMMA); IEEE fp32 cannot, and runs on FFMA."""
    loop = sm90_codebook[name]["loop_counts"]
    if "tf32x3" in name:
        assert sm90.tensor_core_ops(loop) > 0, loop
    else:
        assert sm90.tensor_core_ops(loop) == 0 and loop.get("FFMA", 0) > 0, loop


@pytest.mark.parametrize("backend", ["triton_backend", "reference_backend"])
def test_one_codebook_2d_inputs(request, backend):
    """(N, D), (K, D), (K,) inputs give the (C = 1, ...) results without the leading dimension."""
    device = request.getfixturevalue(backend)
    x, codebook, counts = make_codebook(1, 70, 20, 24, torch.float32, device)
    labels = kernels.codebook_assign(x[0], codebook[0], counts[0])
    assert labels.shape == (70,)
    assert torch.equal(labels, kernels.codebook_assign(x, codebook, counts)[0])
    batch_counts, sums = kernels.codebook_accumulate(x[0], labels, 20)
    assert batch_counts.shape == (20,) and sums.shape == (20, 24)
    ref_counts, ref_sums = codebook_accumulate_ref(x, labels[None], 20)
    assert torch.equal(batch_counts, ref_counts[0])
    torch.testing.assert_close(sums, ref_sums[0], atol=1e-5, rtol=1e-5)
    fused = kernels.codebook_assign_accumulate(x[0], codebook[0], counts[0])
    assert [t.shape for t in fused] == [(70,), (20,), (20, 24)]
    assert torch.equal(fused[0], labels) and torch.equal(fused[1], batch_counts)


def test_one_codebook_shape_errors():
    x, codebook, counts = make_codebook(1, 10, 4, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="codebook must be 2-D"):
        kernels.codebook_assign(x[0], codebook, counts[0])
    with pytest.raises(ValueError, match="counts must be 1-D"):
        kernels.codebook_assign(x[0], codebook[0], counts)
    with pytest.raises(ValueError, match="labels must be 1-D"):
        kernels.codebook_accumulate(x[0], torch.zeros(1, 10, dtype=torch.int64), 4)


def test_fp64_runs_the_reference_in_fp64(triton_backend):
    """fp64 inputs stay fp64 (k-means in fp64), even where the Triton backend is forced."""
    x, codebook, counts = make_codebook(1, 50, 7, 5, torch.float64, triton_backend)
    codebook, counts = codebook.double(), counts.double()
    labels, batch_counts, sums = kernels.codebook_assign_accumulate(x[0], codebook[0], counts[0])
    assert sums.dtype == batch_counts.dtype == torch.float64
    centers = codebook[0] / counts[0, :, None]
    assert torch.equal(labels, ((x[0, :, None] - centers[None]) ** 2).sum(-1).argmin(-1))
    torch.testing.assert_close(sums, torch.zeros(7, 5, dtype=torch.float64).index_add_(0, labels, x[0]))


def test_one_rule_picks_the_codebook_path(triton_backend, monkeypatch):
    """`codebook_fused`: the dispatch rule, except fp64 frames (always the references); the three codebook
    ops and k-means (`spidr_fast.units`) all ask it."""
    from spidr_fast import units
    from spidr_fast.kernels import codebook as cb

    x32 = torch.randn(6, 4, device=triton_backend)
    assert cb.codebook_fused(x32) and not cb.codebook_fused(x32.double())
    monkeypatch.setenv("SPIDR_FAST_REFERENCE_OPS", "codebook")
    assert not cb.codebook_fused(x32)
    monkeypatch.delenv("SPIDR_FAST_REFERENCE_OPS")
    asked = []
    monkeypatch.setattr(cb, "codebook_fused", lambda x: asked.append(x.dtype) or False)
    centers, counts = x32[:3].clone(), torch.ones(3, device=triton_backend)
    labels = cb.codebook_assign(x32, centers, counts)
    cb.codebook_accumulate(x32, labels, 3)
    cb.codebook_assign_accumulate(x32, centers, counts)
    units.assign(x32, centers)
    units.assign_accumulate(x32, centers)  # asks, then its fallback `assign` asks again
    assert asked == [torch.float32] * 6
