"""Codebook assignment and EMA statistics.

Inputs and outputs (C codebooks, N frames, K codewords, D dims):
    x        (C, N, D) fp32/bf16/fp16  teacher targets (instance-normalised)
    codebook (C, K, D) fp32            running sums; a codeword is codebook / counts
    counts   (C, K)    fp32
    labels   (C, N)    int64           argmin_k ||x - codebook_k / counts_k||_2, ties to the lowest k
    sums     (C, K, D) fp32, batch_counts (C, K) fp32: per-codeword sums and counts of x
The public functions also take one codebook as 2-D inputs, x (N, D), codebook (K, D), counts (K,),
labels (N,), and return the same form (for k-means: `spidr_fast.units`, counts = ones). fp64 x runs
the references in fp64 on any device (the kernels are fp32).

Fused path (Triton, one launch per stage for all C codebooks):
  * assignment: grid (N blocks, C). A program holds BLOCK_N frames and streams the codewords in
    BLOCK_K tiles, each as a D-chunked fp32 `tl.dot` (IEEE by default, like the reference), keeping
    a running (min, argmin) of ||c_k||^2 - 2 x.c_k (||x||^2 is the same for every k: dropped). The
    N x K distances never leave registers; x is read once per codeword tile (once when K <= 256 in
    IEEE, K <= 128 with tf32x3: tiles chosen for sm_90 registers, see `assign_config`).
  * accumulation: stable sort of the labels by value (torch), then a segment-sum kernel, grid
    (K, D blocks, C), in which each (codeword, D block) sums its frames in row order. No float
    atomics: the sums are bitwise reproducible. It reads x once more (gathered by label): the
    one-hot GEMM alternative costs 2 N K D flops, which in fp32 outweighs the second read.
The references below are the CPU path and the ground truth for the Triton kernels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from spidr_fast.kernels import _dispatch
from spidr_fast.kernels._utils import block_size, cdiv, jit_in_place

# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

# Plain functions here, `triton.jit`-decorated at the first launch (see `_utils.jit_in_place`).
KERNELS = ("_assign_kernel", "_segment_sum_kernel")

if TYPE_CHECKING:
    import triton.language as tl


def _assign_kernel(
    x_ptr, c_ptr, cnorm_ptr, labels_ptr,
    N, K, D,
    s_xc, s_xn, s_xd, s_cc, s_ck, s_cd, s_nc, s_lc,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    cb = tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    x_rows = x_ptr + cb * s_xc + rows.to(tl.int64)[:, None] * s_xn  # (BLOCK_N, 1)
    best_val = tl.full((BLOCK_N,), float("inf"), tl.float32)
    best_idx = tl.zeros((BLOCK_N,), tl.int32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        c_cols = c_ptr + cb * s_cc + ks[None, :] * s_ck  # (1, BLOCK_K)
        acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            dmask = ds < D
            # bf16/fp16 x is converted before any math (also what the interpreter needs)
            xt = tl.load(x_rows + ds[None, :] * s_xd, mask=rmask[:, None] & dmask[None, :], other=0.0)
            ct = tl.load(c_cols + ds[:, None] * s_cd, mask=dmask[:, None] & kmask[None, :], other=0.0)
            acc = tl.dot(xt.to(tl.float32), ct, acc, input_precision=INPUT_PRECISION)  # (BLOCK_N, BLOCK_K)
        cn = tl.load(cnorm_ptr + cb * s_nc + ks, mask=kmask, other=0.0)
        dist = tl.where(kmask[None, :], cn[None, :] - 2.0 * acc, float("inf"))
        tile_val, tile_idx = tl.min(dist, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_val < best_val  # strict: an equal distance in a later tile keeps the lower index
        best_val = tl.where(better, tile_val, best_val)
        best_idx = tl.where(better, tile_idx + k0, best_idx)
    tl.store(labels_ptr + cb * s_lc + rows, best_idx.to(tl.int64), mask=rmask)


def _segment_sum_kernel(
    x_ptr, order_ptr, offsets_ptr, sums_ptr, counts_ptr,
    D,
    s_xc, s_xn, s_xd, s_oc, s_fc, s_sc, s_sk, s_cc,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    k = tl.program_id(0)
    pid_d = tl.program_id(1)
    cb = tl.program_id(2).to(tl.int64)
    start = tl.load(offsets_ptr + cb * s_fc + k)
    end = tl.load(offsets_ptr + cb * s_fc + k + 1)
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = ds < D
    acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    # frames of codeword k, in increasing frame order (stable sort): a fixed summation order
    for r0 in range(start, end, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        rmask = rs < end
        idx = tl.load(order_ptr + cb * s_oc + rs, mask=rmask, other=0)
        xv = tl.load(
            x_ptr + cb * s_xc + idx[:, None] * s_xn + ds[None, :] * s_xd,
            mask=rmask[:, None] & dmask[None, :],
            other=0.0,
        )
        acc += xv.to(tl.float32)
    tl.store(sums_ptr + cb * s_sc + k * s_sk + ds, tl.sum(acc, axis=0), mask=dmask)
    if pid_d == 0:
        tl.store(counts_ptr + cb * s_cc + k, (end - start).to(tl.float32))


# --------------------------------------------------------------------------------------------
# Launchers (plain tensors in, plain tensors out; no autograd: these are statistics)
# --------------------------------------------------------------------------------------------

ASSIGN_BLOCK_N = 64
PRECISIONS = ("ieee", "tf32x3", "tf32")


def _check(x: Tensor, codebook: Tensor | None = None, counts: Tensor | None = None, precision: str = "ieee") -> None:
    # plain Python checks on static shapes: dynamo evaluates them at trace time (no graph break)
    if x.dim() != 3:
        raise ValueError(f"x must be (C, N, D), or (N, D) for one codebook, got {tuple(x.shape)}")
    if codebook is not None and (codebook.dim() != 3 or codebook.shape[::2] != x.shape[::2]):
        raise ValueError(f"codebook must be (C, K, D) for x {tuple(x.shape)}, got {tuple(codebook.shape)}")
    if counts is not None and codebook is not None and counts.shape != codebook.shape[:2]:
        raise ValueError(f"counts must be (C, K) = {tuple(codebook.shape[:2])}, got {tuple(counts.shape)}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def assign_config(K: int, D: int, precision: str) -> dict:
    """Tiles and launch options of `_assign_kernel` (also read by the offline sm_90 checks in
    tests/kernels/test_codebook.py; figures in bench/results/sm90_static_analysis.md).

    "ieee": the fp32 `tl.dot` runs on FFMA, each thread holding its accumulators plus, for every
    d of a BLOCK_D chunk, its rows' and columns' operands: BLOCK_D = 16 and 32 accumulators a
    thread (BLOCK_N x BLOCK_K / threads) keep a 64 x 256 tile at 128 registers without spills
    (BLOCK_D = 32 and 8 warps: 255 registers and 24 B of stack). One codeword tile when K <= 256,
    so x is read once.
    "tf32x3"/"tf32": tensor cores (wgmma); the operand split into tf32 halves costs registers, so
    a 64 x 128 tile (172 registers; 64 x 256 spilled at 255): x is read once per 128 codewords
    (the second read of a 64-frame block mostly hits L2).
    BLOCK_D never changes the ieee sum order (an FFMA chain over d, chunk after chunk).
    """
    if precision == "ieee":
        block_k = block_size(K, 16, 256)
        return {
            "BLOCK_N": ASSIGN_BLOCK_N,
            "BLOCK_K": block_k,
            "BLOCK_D": 16,
            "num_warps": max(4, block_k // 16),  # 32 accumulators a thread at BLOCK_N = 64
            "num_stages": 2,
        }
    block_k = block_size(K, 16, 128)
    return {
        "BLOCK_N": ASSIGN_BLOCK_N,
        "BLOCK_K": block_k,
        "BLOCK_D": 16,
        "num_warps": 8 if block_k >= 128 else 4,
        "num_stages": 3,
    }


def accumulate_config(D: int) -> dict:
    """Tiles and launch options of `_segment_sum_kernel`."""
    return {"BLOCK_R": 16, "BLOCK_D": block_size(D, 16, 128), "num_warps": 4, "num_stages": 3}


def _assign_launch(x: Tensor, codebook: Tensor, counts: Tensor, precision: str) -> Tensor:
    jit_in_place(globals(), KERNELS)
    C, N, D = x.shape
    K = codebook.shape[1]
    labels = torch.empty((C, N), dtype=torch.int64, device=x.device)
    if C == 0 or N == 0:
        return labels
    # K x D per codebook: tiny next to x. Same arithmetic as the reference's `codebook / counts`.
    centers = codebook.float() / counts.float().unsqueeze(-1)  # (C, K, D)
    norms = (centers * centers).sum(-1)  # (C, K)
    cfg = assign_config(K, D, precision)
    grid = (cdiv(N, cfg["BLOCK_N"]), C)
    _assign_kernel[grid](
        x, centers, norms, labels,
        N, K, D,
        x.stride(0), x.stride(1), x.stride(2), *centers.stride(), norms.stride(0), labels.stride(0),
        INPUT_PRECISION=precision, **cfg,
    )  # fmt: skip
    return labels


def _accumulate_launch(x: Tensor, labels: Tensor, num_codes: int) -> tuple[Tensor, Tensor]:
    jit_in_place(globals(), KERNELS)
    C, N, D = x.shape
    counts = torch.zeros((C, num_codes), dtype=torch.float32, device=x.device)
    sums = torch.zeros((C, num_codes, D), dtype=torch.float32, device=x.device)
    if C == 0 or N == 0 or num_codes == 0:
        return counts, sums
    # Stable sort: frames of one codeword stay in increasing order, so the sums are reproducible.
    sorted_labels, order = torch.sort(labels, dim=1, stable=True)  # (C, N) each
    bounds = torch.arange(num_codes + 1, device=x.device, dtype=sorted_labels.dtype).expand(C, -1).contiguous()
    offsets = torch.searchsorted(sorted_labels, bounds)  # (C, K + 1): frames of k are order[offsets[k]:offsets[k+1]]
    cfg = accumulate_config(D)
    grid = (num_codes, cdiv(D, cfg["BLOCK_D"]), C)
    _segment_sum_kernel[grid](
        x, order, offsets, sums, counts,
        D,
        x.stride(0), x.stride(1), x.stride(2), order.stride(0), offsets.stride(0), sums.stride(0), sums.stride(1),
        counts.stride(0),
        **cfg,
    )  # fmt: skip
    return counts, sums


# --------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile (fullgraph traces through them via the fake kernels)
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("spidr_fast::codebook_assign", mutates_args=())
def _codebook_assign_op(x: Tensor, codebook: Tensor, counts: Tensor, precision: str) -> Tensor:
    return _assign_launch(x, codebook, counts, precision)


@_codebook_assign_op.register_fake
def _(x: Tensor, codebook: Tensor, counts: Tensor, precision: str) -> Tensor:
    return x.new_empty(x.shape[:2], dtype=torch.int64)


@torch.library.custom_op("spidr_fast::codebook_accumulate", mutates_args=())
def _codebook_accumulate_op(x: Tensor, labels: Tensor, num_codes: int) -> tuple[Tensor, Tensor]:
    return _accumulate_launch(x, labels, num_codes)


@_codebook_accumulate_op.register_fake
def _(x: Tensor, labels: Tensor, num_codes: int) -> tuple[Tensor, Tensor]:
    C, _, D = x.shape
    return x.new_empty((C, num_codes), dtype=torch.float32), x.new_empty((C, num_codes, D), dtype=torch.float32)


@torch.library.custom_op("spidr_fast::codebook_assign_accumulate", mutates_args=())
def _codebook_assign_accumulate_op(
    x: Tensor, codebook: Tensor, counts: Tensor, precision: str
) -> tuple[Tensor, Tensor, Tensor]:
    labels = _assign_launch(x, codebook, counts, precision)
    return (labels, *_accumulate_launch(x, labels, codebook.shape[1]))


@_codebook_assign_accumulate_op.register_fake
def _(x: Tensor, codebook: Tensor, counts: Tensor, precision: str) -> tuple[Tensor, Tensor, Tensor]:
    C, N, D = x.shape
    K = codebook.shape[1]
    f32 = torch.float32
    return x.new_empty((C, N), dtype=torch.int64), x.new_empty((C, K), dtype=f32), x.new_empty((C, K, D), dtype=f32)


# --------------------------------------------------------------------------------------------
# Public functions (dispatch: Triton where it runs, else the reference)
# --------------------------------------------------------------------------------------------


def _batched(x: Tensor, **others: tuple[Tensor, int]) -> tuple[bool, tuple[Tensor, ...]]:
    """One codebook given as 2-D inputs ((N, D) x, (K, D) codebook, (K,) counts, (N,) labels) becomes
    the (C = 1, ...) form. `others`: name -> (tensor, its dims in the 2-D form). Returns (was 2-D,
    (x, *others)), unsqueezed views (nothing is copied)."""
    if x.dim() != 2:
        return False, (x, *(t for t, _ in others.values()))
    for name, (t, dims) in others.items():
        if t.dim() != dims:
            raise ValueError(
                f"x is (N, D) = {tuple(x.shape)} (one codebook): {name} must be {dims}-D, got {tuple(t.shape)}"
            )
    return True, (x.unsqueeze(0), *(t.unsqueeze(0) for t, _ in others.values()))


def codebook_fused(x: Tensor) -> bool:
    """Whether the codebook ops on frames `x` run the fused kernels: the dispatch rule
    (`_dispatch.use_fused(x.device, "codebook")`), except for fp64 frames, which always take the references
    (the kernels compute in fp32; k-means in fp64 stays exact). The one rule: the three ops here and
    `spidr_fast.units` (k-means) all ask it."""
    return x.dtype != torch.float64 and _dispatch.use_fused(x.device, "codebook")


def codebook_assign(x: Tensor, codebook: Tensor, counts: Tensor, *, precision: str = "ieee") -> Tensor:
    """Nearest codeword per frame: labels (C, N) int64, ties to the lowest index.

    Args:
        x: (C, N, D) fp32/bf16/fp16, or (N, D) for one codebook; fp64 runs the reference in fp64.
        codebook: (C, K, D) fp32 running sums (codeword = codebook / counts), or (K, D).
        counts: (C, K) fp32, or (K,) (ones when `codebook` holds the codewords themselves).
        precision: the fused kernel's `tl.dot` input precision: "ieee" (default, true fp32 like the
            reference), or on a GPU "tf32x3" (~fp32 on tensor cores) / "tf32" (faster, flips some labels).

    Returns:
        labels (C, N) int64, or (N,) for 2-D inputs.
    """
    flat, (x, codebook, counts) = _batched(x, codebook=(codebook, 2), counts=(counts, 1))
    _check(x, codebook, counts, precision)
    if codebook_fused(x):
        labels = _codebook_assign_op(x, codebook, counts, precision)
    else:
        labels = codebook_assign_ref(x, codebook, counts)
    return labels[0] if flat else labels


def codebook_accumulate(x: Tensor, labels: Tensor, num_codes: int) -> tuple[Tensor, Tensor]:
    """Per-codeword counts and sums of the frames assigned to each codeword.

    Args:
        x: (C, N, D) fp32/bf16/fp16, or (N, D) for one codebook.
        labels: (C, N) int64 in [0, num_codes), or (N,).

    Returns:
        (counts (C, K), sums (C, K, D)) in fp32 (fp64 for fp64 x), or ((K,), (K, D)) for 2-D inputs.
    """
    flat, (x, labels) = _batched(x, labels=(labels, 1))
    _check(x)
    if codebook_fused(x):
        counts, sums = _codebook_accumulate_op(x, labels, num_codes)
    else:
        counts, sums = codebook_accumulate_ref(x, labels, num_codes)
    return (counts[0], sums[0]) if flat else (counts, sums)


def codebook_assign_accumulate(
    x: Tensor, codebook: Tensor, counts: Tensor, *, precision: str = "ieee"
) -> tuple[Tensor, Tensor, Tensor]:
    """`codebook_assign` then `codebook_accumulate` as one op: (labels, batch_counts, sums).

    Takes the (C, ...) form or one codebook's 2-D inputs, as `codebook_assign`; returns the same form.
    """
    flat, (x, codebook, counts) = _batched(x, codebook=(codebook, 2), counts=(counts, 1))
    _check(x, codebook, counts, precision)
    if codebook_fused(x):
        out = _codebook_assign_accumulate_op(x, codebook, counts, precision)
    else:
        out = codebook_assign_accumulate_ref(x, codebook, counts)
    return tuple(t[0] for t in out) if flat else out


# --------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------


def codebook_assign_ref(x: Tensor, codebook: Tensor, counts: Tensor) -> Tensor:
    """Nearest codeword per frame, in fp32 (fp64 for fp64 x), exactly as the reference (`cdist(...).argmin`)."""
    dtype = _compute_dtype(x)
    centers = codebook.to(dtype) / counts.to(dtype).unsqueeze(-1)  # (C, K, D)
    return torch.cdist(x.to(dtype), centers, p=2).argmin(-1)


def codebook_accumulate_ref(x: Tensor, labels: Tensor, num_codes: int) -> tuple[Tensor, Tensor]:
    """Per-codeword counts (C, K) and sums (C, K, D) of the frames assigned to each codeword (fp32, or fp64)."""
    dtype = _compute_dtype(x)
    onehot = F.one_hot(labels, num_codes).to(dtype)  # (C, N, K)
    return onehot.sum(1), torch.bmm(onehot.transpose(1, 2), x.to(dtype))


def _compute_dtype(x: Tensor) -> torch.dtype:
    """fp32, or fp64 for fp64 inputs (k-means in fp64, `spidr_fast.units`): never below fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def codebook_assign_accumulate_ref(x: Tensor, codebook: Tensor, counts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    labels = codebook_assign_ref(x, codebook, counts)
    return (labels, *codebook_accumulate_ref(x, labels, codebook.shape[1]))


def codebook_ema_update_(
    codebook: Tensor, counts: Tensor, batch_counts: Tensor, batch_sums: Tensor, decay: float
) -> None:
    """In place: for codewords assigned at least once, counts = d counts + (1-d) n, codebook likewise.

    Follows the reference's fp32 arithmetic (alpha is an fp32 tensor, so 0.9 is 0.89999998 and
    1 - alpha is computed in fp32); unassigned codewords keep alpha = 1 and do not move. A handful
    of elementwise ops over C x K x D (6 MB at the base shape): torch (or compile) fuses them.
    """
    alpha = torch.where(batch_counts != 0, torch.full_like(batch_counts, decay), torch.ones_like(batch_counts))
    counts.copy_(alpha * counts + (1 - alpha) * batch_counts)
    alpha = alpha.unsqueeze(-1)
    codebook.copy_(alpha * codebook + (1 - alpha) * batch_sums)
