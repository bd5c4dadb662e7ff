"""Fused heads + cross-entropy (forward, backward, probability sums) against the reference."""

from __future__ import annotations

import math

import pytest
import torch

from bench import sm90
from spidr_fast import kernels
from spidr_fast.kernels import heads_ce as hce
from spidr_fast.kernels.heads_ce import heads_cross_entropy_ref
from tests.kernels.utils import assert_close_to_truth

ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-4}

# (C, N, H, V, expanded): N = 0 and 1, N not a multiple of the 64- and 32-frame blocks, H = 59, V = 1, V not a
# power of two and wider than 256, and an expanded h (DinoSR: every head reads the same layer).
SHAPES = [
    (2, 70, 59, 40, False),
    (1, 1, 16, 1, False),
    (3, 0, 32, 16, False),
    (2, 65, 48, 256, True),
    (1, 130, 24, 300, False),
]


def make_inputs(C, N, H, V, expanded, dtype, device):
    base = torch.randn((N, H) if expanded else (C, N, H), device=device)
    weight = torch.randn(C, V, H, device=device) / math.sqrt(H)
    bias = torch.randn(C, V, device=device) * 0.1
    labels = torch.randint(0, V, (C, N), device=device)
    grad_loss = torch.rand(C, N, device=device)
    return [t.to(dtype).requires_grad_() for t in (base, weight, bias)], labels, grad_loss


def run(fn, leaves, labels, grad_loss, C, expanded, dtype=None):
    """loss, prob_sums and the gradients of sum(loss * grad_loss) w.r.t. (base, weight, bias)."""
    if dtype is not None:
        leaves = [t.detach().to(dtype).requires_grad_() for t in leaves]
    base, weight, bias = leaves
    h = base.expand(C, *base.shape) if expanded else base
    loss, prob_sums = fn(h, weight, bias, labels)
    grads = torch.autograd.grad((loss * grad_loss).sum(), leaves, allow_unused=True) if loss.numel() else (None,) * 3
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]
    return [loss, prob_sums, *grads]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_heads_cross_entropy(triton_backend, shape, dtype):
    C, N, _, V, expanded = shape
    if dtype != torch.float32 and N < 2:
        pytest.skip("edge sizes run in fp32 only")
    leaves, labels, grad_loss = make_inputs(*shape, dtype, triton_backend)
    got = run(kernels.heads_cross_entropy, leaves, labels, grad_loss, C, expanded)
    pt = run(heads_cross_entropy_ref, leaves, labels, grad_loss, C, expanded)
    truth = run(heads_cross_entropy_ref, leaves, labels, grad_loss, C, expanded, dtype=torch.float64)
    assert got[0].dtype == got[1].dtype == torch.float32 and got[0].shape == (C, N) and got[1].shape == (C, V)
    assert not got[1].requires_grad
    for name, g, p, t in zip(["loss", "prob_sums", "grad_h", "grad_weight", "grad_bias"], got, pt, truth):
        assert g.shape == t.shape
        assert g.dtype == p.dtype, name
        assert_close_to_truth(name, g, p, t, ATOL[dtype])


def test_grad_of_mean_loss(triton_backend):
    """A broadcast (stride-0) incoming gradient, as loss.mean().backward() produces."""
    leaves, labels, _ = make_inputs(2, 40, 32, 24, False, torch.float32, triton_backend)
    loss, _ = kernels.heads_cross_entropy(*leaves, labels)
    got = torch.autograd.grad(loss.mean(), leaves)
    loss, _ = heads_cross_entropy_ref(*leaves, labels)
    want = torch.autograd.grad(loss.mean(), leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


def test_deterministic(triton_backend):
    leaves, labels, grad_loss = make_inputs(2, 150, 40, 48, True, torch.float32, triton_backend)
    first = run(kernels.heads_cross_entropy, leaves, labels, grad_loss, 2, True)
    second = run(kernels.heads_cross_entropy, leaves, labels, grad_loss, 2, True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_autocast_casts_like_the_reference(triton_backend):
    """Under autocast the fused path computes in the autocast dtype; fp32 parameters get fp32 grads."""
    leaves, labels, grad_loss = make_inputs(2, 30, 32, 16, False, torch.float32, triton_backend)
    with torch.autocast(triton_backend, dtype=torch.bfloat16):
        got = run(kernels.heads_cross_entropy, leaves, labels, grad_loss, 2, False)
        pt = run(heads_cross_entropy_ref, leaves, labels, grad_loss, 2, False)
    truth = run(heads_cross_entropy_ref, leaves, labels, grad_loss, 2, False, dtype=torch.float64)
    for name, g, p, t in zip(["loss", "prob_sums", "grad_h", "grad_weight", "grad_bias"], got, pt, truth):
        assert g.dtype == p.dtype, name
        assert_close_to_truth(name, g, p, t, 2e-2)  # both round h and W to bf16


def check_against_reference(h, weight, bias, labels, atol: float) -> None:
    """Loss, prob_sums and the gradients of the fused path against the reference on the same tensors."""
    leaves = [h, weight, bias]
    grad_loss = torch.rand(labels.shape, device=h.device)
    results = []
    for fn in (kernels.heads_cross_entropy, heads_cross_entropy_ref):
        loss, prob_sums = fn(h, weight, bias, labels)
        results.append([loss, prob_sums, *torch.autograd.grad((loss * grad_loss).sum(), leaves)])
    for name, g, p in zip(["loss", "prob_sums", "grad_h", "grad_weight", "grad_bias"], *results):
        torch.testing.assert_close(g, p, atol=atol, rtol=1e-4, msg=name)


def test_strided_labels_and_bias(triton_backend):
    """Labels and bias read through their strides (a (C, N) view of an (N, C) tensor; a bias column of
    a wider tensor): before, the kernels assumed unit strides and silently read the wrong values."""
    C, N, H, V = 3, 37, 24, 20
    h = torch.randn(C, N, H, device=triton_backend, requires_grad=True)
    weight = (torch.randn(C, V, H, device=triton_backend) / math.sqrt(H)).requires_grad_()
    bias_store = torch.randn(C, V, 2, device=triton_backend) * 0.5
    bias = bias_store[..., 1].requires_grad_()  # stride (2V, 2): a non-leaf view is fine for grad
    labels = torch.randint(0, V, (N, C), device=triton_backend).t()  # (C, N), strides (1, C)
    assert bias.stride() == (2 * V, 2) and labels.stride() == (1, C)
    check_against_reference(h, weight, bias, labels, atol=1e-5)


@pytest.mark.parametrize("V", [257, 320, 512])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_codebooks_wider_than_256(triton_backend, V, dtype):
    """V > 256 runs with smaller row blocks (BLOCK_N x BLOCK_V <= 64 x 256) and fewer stages where
    shared memory is short; the result is the reference's."""
    shape = (2, 23, 24, V, False)
    leaves, labels, grad_loss = make_inputs(*shape, dtype, triton_backend)
    got = run(kernels.heads_cross_entropy, leaves, labels, grad_loss, 2, False)
    pt = run(heads_cross_entropy_ref, leaves, labels, grad_loss, 2, False)
    truth = run(heads_cross_entropy_ref, leaves, labels, grad_loss, 2, False, dtype=torch.float64)
    for name, g, p, t in zip(["loss", "prob_sums", "grad_h", "grad_weight", "grad_bias"], got, pt, truth):
        assert_close_to_truth(name, g, p, t, ATOL[dtype])


@pytest.mark.parametrize(
    ("V", "dtype"), [(256, torch.float32), (512, torch.float32)] + [(V, torch.bfloat16) for V in (256, 512, 1024)]
)
def test_launch_config_fits_shared_memory(V, dtype):
    """Pipelined (h, W^T) chunks fit an A100's 163 KB (the default budget) and an H100's 227 KB; the
    logits tile stays at <= 64 x 256 values; a budget too small for one stage is a clear error."""
    for budget in (163 * 1024, 227 * 1024):
        cfg = hce.launch_config(dtype, V, on_gpu=True, shared_memory=budget)
        stage = (cfg["BLOCK_N"] + cfg["BLOCK_V"]) * cfg["BLOCK_H"] * dtype.itemsize
        assert cfg["num_stages"] >= 1 and cfg["num_stages"] * stage <= budget
        assert cfg["BLOCK_N"] * cfg["BLOCK_V"] <= 64 * 256 and cfg["BLOCK_V"] >= V
    with pytest.raises(ValueError, match="shared memory"):
        hce.launch_config(dtype, V, on_gpu=True, shared_memory=1024)
    limit = 512 if dtype == torch.float32 else 1024
    with pytest.raises(ValueError, match=rf"codebook size V \(weight.shape\[1\]\) in \[1, {limit}\]"):
        hce.launch_config(dtype, limit + 1, on_gpu=True)


@pytest.fixture
def fp32_precision():
    """Restore torch's fp32 matmul setting (new API where it exists, else the legacy flag)."""
    matmul = torch.backends.cuda.matmul
    saved = getattr(matmul, "fp32_precision", None)
    legacy = None if saved is not None else matmul.allow_tf32
    yield
    if saved is not None:
        matmul.fp32_precision = saved
    else:
        matmul.allow_tf32 = legacy


@pytest.mark.parametrize("api", ["new", "legacy", "matmul_precision"])
def test_tf32_setting_read_through_either_api(fp32_precision, api):
    """TF32 set through torch's `fp32_precision` API made the legacy `allow_tf32` read raise; either
    API is followed now, and only for fp32 inputs (bf16 never reads it)."""
    matmul = torch.backends.cuda.matmul
    if api == "new" and not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch < 2.9 has no fp32_precision API")
    for tf32 in (True, False):
        if api == "new":
            matmul.fp32_precision = "tf32" if tf32 else "ieee"
        elif api == "legacy":
            matmul.allow_tf32 = tf32
        else:
            torch.set_float32_matmul_precision("high" if tf32 else "highest")
        assert hce.fp32_matmul_uses_tf32() is tf32
        cfg = hce.launch_config(torch.float32, 256, on_gpu=True)
        assert cfg["INPUT_PRECISION"] == ("tf32" if tf32 else "ieee")
        assert hce.launch_config(torch.float32, 256, on_gpu=False)["INPUT_PRECISION"] == "ieee"  # interpreter
        assert hce.launch_config(torch.bfloat16, 256, on_gpu=True)["INPUT_PRECISION"] == "ieee"
    torch.set_float32_matmul_precision("highest")


def test_bf16_does_not_read_the_tf32_setting(monkeypatch):
    def refuse():
        raise AssertionError("read the fp32 matmul setting for bf16 inputs")

    monkeypatch.setattr(hce, "fp32_matmul_uses_tf32", refuse)
    assert hce.launch_config(torch.bfloat16, 256, on_gpu=True)["INPUT_PRECISION"] == "ieee"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape", [(8, 40_000, 768, 256, False), (8, 4097, 768, 256, True), (3, 1000, 100, 100, False)]
)
def test_gpu_grid(triton_backend, shape, dtype):
    test_heads_cross_entropy(triton_backend, shape, dtype)


# --------------------------------------------------------------------------------------------
# sm_90 compiler facts (no GPU needed): see bench/sm90.py, bench/results/sm90_static_analysis.md
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sm90_heads():
    """Both kernels compiled for an H100 at the base shapes (C=8, N=40k, H=768, V=256), bf16 and fp32,
    with the configuration `launch_config` picks on a GPU: one child process for the module."""
    return sm90.base_shapes_or_skip("heads_ce")


@pytest.mark.parametrize("name", sm90.kernel_names("heads_ce"))
def test_sm90_no_spills(sm90_heads, name):
    """Before: fp32 (IEEE, FFMA) spilled 5.5-6 KB (forward) and 0.2-14 KB (backward, by ptxas version)
    a thread; the bf16 backward sat at 252-254 registers. Now: bf16 194/184-196, fp32 82/116, no stack."""
    sm90.assert_fits(name, sm90_heads[name], max_regs=128 if name.endswith("fp32") else 224)


@pytest.mark.parametrize("name", [n for n in sm90.kernel_names("heads_ce") if n.endswith("bf16")])
def test_sm90_bf16_heads_use_tensor_cores(sm90_heads, name):
    """The bf16 GEMMs (logits; grad_h in the backward) run on HGMMA, not FFMA (an FFMA GEMM would put
    hundreds of FFMA in each loop iteration)."""
    loop = sm90_heads[name]["loop_counts"]
    assert sm90.tensor_core_ops(loop) > 0, loop
    assert loop.get("FFMA", 0) < 64, loop
