"""Prediction heads + log-softmax + cross-entropy against codebook labels.

Inputs and outputs (C heads, N frames, H hidden, V = codebook size):
    h       (C, N, H)  any float (each head reads its own layer; DinoSR passes an expanded view)
    weight  (C, V, H), bias (C, V)
    labels  (C, N) int64
    loss    (C, N) fp32        -log_softmax(h W^T + b)[label]
    prob_sums (C, V) fp32      sum over frames of softmax probabilities (for the perplexity)

Fused path (Triton, grid (N blocks, C): one launch per direction for all heads):
  * forward: a program computes a (BLOCK_N, V) logits tile (whole rows: V <= MAX_V) as an
    H-chunked `tl.dot`, then in the epilogue the row logsumexp, the loss, and the column sums of
    the softmax probabilities (one partial per block, reduced in a fixed order: deterministic). It
    stores only loss and the per-row logsumexp (C, N) for the backward, never the log-probabilities.
  * backward: the kernel recomputes the logits tile, forms dlogits = (softmax - onehot) * dloss,
    writes grad_h = dlogits W and the per-block column sums for grad_bias, and stores dlogits
    (C, N, V) in the compute dtype (a third of h's size at V=256, H=768) for grad_weight =
    dlogits^T h, one batched cuBLAS GEMM (a reduction over N: deterministic, unlike atomics).
Compute dtype: fp32 inputs run IEEE fp32 dots; bf16/fp16 run native dots with fp32 accumulation
on a GPU (fp32 under the interpreter, which cannot run bf16 dots). Under autocast the public
function casts h, weight, bias to the autocast dtype first, as the reference's baddbmm would.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from spidr_fast.kernels import _dispatch
from spidr_fast.kernels._utils import (
    block_size,
    cdiv,
    dot_in_fp32,
    fp32_uses_tf32,
    jit_in_place,
    kernel_out_dtype,
    next_pow2,
)

MAX_V = 1024  # whole softmax rows live in registers; wider vocabularies take the reference path
MAX_V_FMA = 512  # the same for fp32 inputs (the FFMA tiles: see `max_vocabulary`)
# (BLOCK_N at V <= 256, BLOCK_H, num_warps, num_stages), chosen from sm_90 compiles of both kernels
# at the base shapes (bench/results/sm90_static_analysis.md; checked by tests/kernels/test_heads_ce.py):
#  * tensor cores (bf16/fp16; fp32 under TF32): BLOCK_H = 64 took the backward to 252-254 registers
#    (no spill yet, no headroom); 32 gives 194 (fwd) / 196 (bwd), HGMMA in both loops.
#  * FFMA (fp32 IEEE): a 64 x 256 tile with BLOCK_H = 64 and 8 warps spilled (forward: 32 registers +
#    5.5-6 KB of stack; backward: 192 B to 14 KB by ptxas version); 32 rows, BLOCK_H = 16, 16 warps:
#    82 / 116 registers, no spill.
# Both directions share one configuration, so the backward recomputes the forward's logits exactly.
TILES_MMA = (64, 32, 8, 3)
TILES_FMA = (32, 16, 16, 2)
SHARED_MEMORY = 163 * 1024  # an A100's opt-in shared memory per block: the default budget

# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

# Plain functions here, `triton.jit`-decorated at the first launch (see `_utils.jit_in_place`).
KERNELS = ("_logits_block", "_heads_ce_fwd_kernel", "_heads_ce_bwd_kernel")

if TYPE_CHECKING:
    import triton.language as tl


def _logits_block(
    h_ptr, w_ptr, b_ptr,
    N, H, V, s_hc, s_hn, s_hh, s_wc, s_wv, s_wh, s_bc, s_bv,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    """This program's frames (rows) of head cb and their (BLOCK_N, BLOCK_V) fp32 logits h W^T + b
    (-inf in the padding columns), with the row/column indices and masks."""
    pid_n = tl.program_id(0)
    cb = tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    cols = tl.arange(0, BLOCK_V)
    vmask = cols < V
    h_rows = h_ptr + cb * s_hc + rows.to(tl.int64)[:, None] * s_hn  # (BLOCK_N, 1)
    w_cols = w_ptr + cb * s_wc + cols[None, :] * s_wv  # (1, BLOCK_V)
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        hmask = hs < H
        a = tl.load(h_rows + hs[None, :] * s_hh, mask=rmask[:, None] & hmask[None, :], other=0.0)
        wt = tl.load(w_cols + hs[:, None] * s_wh, mask=hmask[:, None] & vmask[None, :], other=0.0)  # W^T tile
        if DOT_FP32:
            acc = tl.dot(a.to(tl.float32), wt.to(tl.float32), acc, input_precision=INPUT_PRECISION)
        else:
            acc = tl.dot(a, wt, acc)  # bf16/fp16 tensor cores, fp32 accumulation
    bias = tl.load(b_ptr + cb * s_bc + cols * s_bv, mask=vmask, other=0.0).to(tl.float32)
    logits = tl.where(vmask[None, :], acc + bias[None, :], float("-inf"))
    return pid_n, cb, rows, rmask, cols, vmask, logits


def _heads_ce_fwd_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, loss_ptr, lse_ptr, psum_ptr,
    N, H, V,
    s_hc, s_hn, s_hh, s_wc, s_wv, s_wh, s_bc, s_bv, s_lc, s_ln, s_oc, s_pc, s_pb,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_n, cb, rows, rmask, cols, vmask, logits = _logits_block(
        h_ptr, w_ptr, b_ptr, N, H, V, s_hc, s_hn, s_hh, s_wc, s_wv, s_wh, s_bc, s_bv,
        BLOCK_N, BLOCK_V, BLOCK_H, DOT_FP32, INPUT_PRECISION,
    )  # fmt: skip
    row_max = tl.max(logits, axis=1)
    p = tl.exp(logits - row_max[:, None])  # 0 in the padding columns
    row_sum = tl.sum(p, axis=1)
    lse = row_max + tl.log(row_sum)
    lab = tl.load(labels_ptr + cb * s_lc + rows.to(tl.int64) * s_ln, mask=rmask, other=0)
    target = tl.sum(tl.where(cols[None, :] == lab[:, None], logits, 0.0), axis=1)
    tl.store(loss_ptr + cb * s_oc + rows, lse - target, mask=rmask)
    tl.store(lse_ptr + cb * s_oc + rows, lse, mask=rmask)
    probs = tl.where(rmask[:, None], p / row_sum[:, None], 0.0)
    tl.store(psum_ptr + cb * s_pc + pid_n * s_pb + cols, tl.sum(probs, axis=0), mask=vmask)


def _heads_ce_bwd_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, lse_ptr, gloss_ptr, gh_ptr, dlog_ptr, gb_ptr,
    N, H, V,
    s_hc, s_hn, s_hh, s_wc, s_wv, s_wh, s_bc, s_bv, s_lc, s_ln, s_oc, s_gc, s_gn, s_ghc, s_ghn, s_dc, s_dn, s_pc, s_pb,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_n, cb, rows, rmask, cols, vmask, logits = _logits_block(
        h_ptr, w_ptr, b_ptr, N, H, V, s_hc, s_hn, s_hh, s_wc, s_wv, s_wh, s_bc, s_bv,
        BLOCK_N, BLOCK_V, BLOCK_H, DOT_FP32, INPUT_PRECISION,
    )  # fmt: skip
    lse = tl.load(lse_ptr + cb * s_oc + rows, mask=rmask, other=0.0)
    g = tl.load(gloss_ptr + cb * s_gc + rows.to(tl.int64) * s_gn, mask=rmask, other=0.0).to(tl.float32)
    lab = tl.load(labels_ptr + cb * s_lc + rows.to(tl.int64) * s_ln, mask=rmask, other=0)
    p = tl.exp(logits - lse[:, None])
    dl = (p - tl.where(cols[None, :] == lab[:, None], 1.0, 0.0)) * g[:, None]
    dl = tl.where(rmask[:, None] & vmask[None, :], dl, 0.0)  # (BLOCK_N, BLOCK_V) fp32
    tl.store(gb_ptr + cb * s_pc + pid_n * s_pb + cols, tl.sum(dl, axis=0), mask=vmask)
    row_off = rows.to(tl.int64)[:, None]
    dl_store = dl.to(dlog_ptr.dtype.element_ty)
    tl.store(dlog_ptr + cb * s_dc + row_off * s_dn + cols[None, :], dl_store, mask=rmask[:, None] & vmask[None, :])
    # grad_h = dlogits @ W, H-chunked: (BLOCK_N, V) x (V, BLOCK_H)
    w_rows = w_ptr + cb * s_wc + cols[:, None] * s_wv  # (BLOCK_V, 1)
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        hmask = hs < H
        wt = tl.load(w_rows + hs[None, :] * s_wh, mask=vmask[:, None] & hmask[None, :], other=0.0)
        if DOT_FP32:
            gh = tl.dot(dl, wt.to(tl.float32), input_precision=INPUT_PRECISION)
        else:
            gh = tl.dot(dl.to(wt.dtype), wt)  # dlogits rounded to the compute dtype, as autograd would
        tl.store(
            gh_ptr + cb * s_ghc + row_off * s_ghn + hs[None, :],
            gh.to(gh_ptr.dtype.element_ty),
            mask=rmask[:, None] & hmask[None, :],
        )


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def fp32_matmul_uses_tf32() -> bool:
    """torch's own fp32 matmul setting (TF32 or IEEE): `torch.backends.cuda.matmul`'s, else the global one."""
    matmul = torch.backends.cuda.matmul
    return fp32_uses_tf32((matmul, torch.backends), matmul)


def max_vocabulary(dtype: torch.dtype) -> int:
    """Widest V the fused kernels take for inputs of `dtype` without spilling on sm_90 (fp32 may run
    the FFMA tiles, whose backward spills above 512 at the 128-register cap of 16 warps)."""
    return MAX_V_FMA if dtype == torch.float32 else MAX_V


def launch_config(dtype: torch.dtype, V: int, on_gpu: bool, shared_memory: int = SHARED_MEMORY) -> dict:
    """Tiles and launch options of both heads kernels (also read by the offline sm_90 checks).

    Whole softmax rows: a program holds a (BLOCK_N, BLOCK_V) fp32 logits tile, so BLOCK_N shrinks
    as V grows (<= BLOCK_N x 256 values) and V > 256 takes 16 warps (8 spill at V = 1024); the
    pipeline keeps `num_stages` (h, W^T) chunks in shared memory: as many as `shared_memory` bytes
    hold (an A100's 163 KB by default; the launcher passes the device's own), 2 at V = 1024. Rows
    of fewer than 64 frames (V > 256) run mma.sync (HMMA), not wgmma. Measured under triton 3.6 for
    sm_90: bench/results/sm90_static_analysis.md. The TF32 setting only matters for fp32 inputs.
    """
    if not 0 < V <= max_vocabulary(dtype):
        raise ValueError(
            f"heads_cross_entropy: the fused kernels take a codebook size V (weight.shape[1]) in"
            f" [1, {max_vocabulary(dtype)}] for {dtype}, got {V} (the reference path takes any)"
        )
    fp32 = dot_in_fp32(dtype)
    tf32 = on_gpu and dtype == torch.float32 and fp32_matmul_uses_tf32()
    block_v = block_size(V, 16, next_pow2(MAX_V))
    # tiles by dtype, not by DOT_FP32: the interpreter (fp32 dots for bf16) runs the GPU's tiles
    block_n, block_h, warps, stages = TILES_FMA if dtype == torch.float32 and not tf32 else TILES_MMA
    block_n = max(16, block_n * 256 // max(block_v, 256))  # <= block_n x 256 fp32 logits per program
    stage_bytes = (block_n + block_v) * block_h * dtype.itemsize  # one h chunk + one W^T chunk
    stages = min(stages, shared_memory // stage_bytes, 2 if block_v > 512 else stages)  # 3 at V = 1024 spill
    if stages < 1:
        raise ValueError(
            f"heads_cross_entropy: V={V} needs {stage_bytes} B of shared memory, the device has {shared_memory}"
        )
    return {
        "BLOCK_N": block_n,
        "BLOCK_V": block_v,
        "BLOCK_H": block_h,
        "DOT_FP32": fp32,
        "INPUT_PRECISION": "tf32" if tf32 else "ieee",
        "num_warps": 4 if block_v < 128 else (16 if block_v > 256 else warps),
        "num_stages": stages,
    }


def _launch_cfg(h: Tensor, V: int) -> dict:
    if not h.is_cuda:  # the interpreter
        return launch_config(h.dtype, V, on_gpu=False)
    return launch_config(h.dtype, V, on_gpu=True, shared_memory=_shared_memory(h.device))


@functools.cache
def _shared_memory(device: torch.device) -> int:
    """Shared memory a block may opt into on `device` (A100 163 KB, H100/H200 227 KB)."""
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", SHARED_MEMORY)


def _fwd_launch(h: Tensor, weight: Tensor, bias: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    jit_in_place(globals(), KERNELS)
    C, N, H = h.shape
    V = weight.shape[1]
    loss = torch.empty((C, N), dtype=torch.float32, device=h.device)
    lse = torch.empty((C, N), dtype=torch.float32, device=h.device)
    cfg = _launch_cfg(h, V)
    nblk = cdiv(N, cfg["BLOCK_N"]) if N else 0
    partial = torch.zeros((C, max(nblk, 1), V), dtype=torch.float32, device=h.device)
    if C and N:
        _heads_ce_fwd_kernel[(nblk, C)](
            h, weight, bias, labels, loss, lse, partial,
            N, H, V,
            *h.stride(), *weight.stride(), *bias.stride(), *labels.stride(), loss.stride(0), *partial.stride()[:2],
            **cfg,
        )  # fmt: skip
    return loss, lse, partial.sum(1)  # fixed-order reduction of the per-block probability sums


def _bwd_launch(
    grad_loss: Tensor, h: Tensor, weight: Tensor, bias: Tensor, labels: Tensor, lse: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    jit_in_place(globals(), KERNELS)
    C, N, H = h.shape
    V = weight.shape[1]
    grad_h = torch.empty((C, N, H), dtype=kernel_out_dtype(h.dtype), device=h.device)
    dl_dtype = torch.float32 if dot_in_fp32(h.dtype) else h.dtype
    dlogits = torch.empty((C, N, V), dtype=dl_dtype, device=h.device)
    cfg = _launch_cfg(h, V)
    nblk = cdiv(N, cfg["BLOCK_N"]) if N else 0
    partial = torch.zeros((C, max(nblk, 1), V), dtype=torch.float32, device=h.device)
    if C and N:
        _heads_ce_bwd_kernel[(nblk, C)](
            h, weight, bias, labels, lse, grad_loss, grad_h, dlogits, partial,
            N, H, V,
            *h.stride(), *weight.stride(), *bias.stride(), *labels.stride(), lse.stride(0), *grad_loss.stride(),
            *grad_h.stride()[:2], *dlogits.stride()[:2], *partial.stride()[:2],
            **cfg,
        )  # fmt: skip
    with torch.autocast(h.device.type, enabled=False):  # a backward may run inside an autocast region
        grad_w = torch.bmm(dlogits.transpose(1, 2), h.to(dl_dtype))  # (C, V, H)
    return grad_h.to(h.dtype), grad_w.to(weight.dtype), partial.sum(1).to(bias.dtype)


# --------------------------------------------------------------------------------------------
# Custom ops + autograd
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("spidr_fast::heads_ce", mutates_args=())
def _heads_ce_op(h: Tensor, weight: Tensor, bias: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, lse, prob_sums); lse (C, N) fp32 is kept for the backward."""
    return _fwd_launch(h, weight, bias, labels)


@_heads_ce_op.register_fake
def _(h: Tensor, weight: Tensor, bias: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    C, N, _ = h.shape
    f32 = torch.float32
    return h.new_empty((C, N), dtype=f32), h.new_empty((C, N), dtype=f32), h.new_empty(bias.shape, dtype=f32)


@torch.library.custom_op("spidr_fast::heads_ce_backward", mutates_args=())
def _heads_ce_backward_op(
    grad_loss: Tensor, h: Tensor, weight: Tensor, bias: Tensor, labels: Tensor, lse: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    return _bwd_launch(grad_loss, h, weight, bias, labels, lse)


@_heads_ce_backward_op.register_fake
def _(
    grad_loss: Tensor, h: Tensor, weight: Tensor, bias: Tensor, labels: Tensor, lse: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    return h.new_empty(h.shape), torch.empty_like(weight), torch.empty_like(bias)


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    h, weight, bias, labels = inputs
    ctx.save_for_backward(h, weight, bias, labels, output[1])


def _backward(ctx, grad_loss: Tensor, grad_lse: Tensor | None, grad_psums: Tensor | None) -> tuple:
    # lse and prob_sums are statistics (the public function detaches prob_sums): no gradient flows
    h, weight, bias, labels, lse = ctx.saved_tensors
    grad_h, grad_w, grad_b = _heads_ce_backward_op(grad_loss, h, weight, bias, labels, lse)
    return grad_h, grad_w, grad_b, None


_heads_ce_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public function (dispatch: Triton where it runs, else the reference)
# --------------------------------------------------------------------------------------------


def heads_cross_entropy(h: Tensor, weight: Tensor, bias: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-frame cross-entropy of C linear heads: (loss (C, N) fp32, prob_sums (C, V) fp32, detached).

    Differentiable in h, weight, bias. `h` may be an expanded (C, N, H) view of one (N, H) layer.
    """
    if (h.dim(), weight.dim(), bias.dim()) != (3, 3, 2):
        raise ValueError(f"h, weight, bias must be (C,N,H), (C,V,H), (C,V): {h.shape}, {weight.shape}, {bias.shape}")
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
    if _dispatch.use_fused(h.device, "heads_ce") and weight.shape[1] <= max_vocabulary(dtype):
        if h.dtype != dtype and h.stride(0) == 0:  # cast the one shared layer, not C copies of it
            h = h.select(0, 0).to(dtype).unsqueeze(0).expand(h.shape)
        loss, _, prob_sums = _heads_ce_op(h.to(dtype), weight.to(dtype), bias.to(dtype), labels)
        return loss, prob_sums.detach()
    return heads_cross_entropy_ref(h, weight, bias, labels)


def heads_cross_entropy_ref(h: Tensor, weight: Tensor, bias: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Reference: materialises the (C, N, V) log-probabilities (autograd through plain torch)."""
    logits = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))  # (C, N, V)
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    loss = -log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return loss, log_probs.detach().exp().sum(1)
