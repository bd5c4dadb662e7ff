"""The conv front-end's first block in one op: Conv1d(1 -> C) on the raw waveform + channel LayerNorm + GELU.

Inputs and outputs (B batch, S samples, C channels, K taps, T = (S - K) // stride + 1 frames, 0 when S < K):
    x            (B, S) fp32/bf16/fp16      the waveforms (no gradient: see below)
    conv_weight  (C, 1, K), conv_bias (C,) | None          the Conv1d's parameters
    ln_weight, ln_bias (C,) | None                         the channel LayerNorm's affine parameters
    y            (B, C, T) out_dtype        gelu(layer_norm over C of u), u[c, t] = sum_j w[c, j] x[stride t + j]
                                            (+ conv bias), exact erf GELU; channels-last (stored (B, T, C): what
                                            the next conv's cuDNN NHWC kernels read) or contiguous, as asked
    mean, rstd   (B, T) fp32                per-frame statistics of u, kept for the backward

Why: the first block's output is the front-end's largest tensor (~768k frames x 512 channels per base step of
16 x 15 s). Run as Conv1d then `conv_frontend.channel_layer_norm_gelu`, the conv writes u, the LN+GELU reads it
and writes y; in the backward the LN+GELU backward writes du (u's size), which cuDNN's conv backward reads again
only to compute the weight gradient (the waveform needs none). With K = 10 taps of 1 channel the conv is ~20
FLOPs per output value, pure memory traffic: here u and du live only in registers. The forward reads the waveform
(~1/50 of y's bytes) and writes y; the backward reads the waveform and dy and writes parameter gradients only.
`bench/roofline.py` predicts, on an H100, 2.1 -> 0.6 ms for the block in a training step (phase A) and 0.89 ->
0.31 ms extractor frozen (phase B).

Fused path (Triton), math in fp32 for every input dtype (bf16/fp16 converted after the load):
  * the conv: a (BLOCK_C, BLOCK_T) tile of u (whole columns) is one tl.dot of the taps (BLOCK_C, KP) by the waveform
    patches X (KP, BLOCK_T), X[j, t] = x[stride t + j], K padded to KP >= 16 with zeros. TF32 on tensor cores when
    y is bf16/fp16 (under autocast the two-op path runs the conv in bf16, coarser than TF32) or where cuDNN would
    run an fp32 conv in TF32 (`conv_uses_tf32`, PyTorch's default); else IEEE fp32 on FFMA (fp32 training: the
    trainer turns TF32 off, `train/env.py`). The interpreter's dot is always exact fp32.
  * forward: grid (T blocks, B). A program computes its tile of u - mean_C(u) directly, with the conv weight and bias
    centred over C (`_centred_conv`; mean_C(u) from the mean filter, a (KP,) dot per frame), then the LayerNorm +
    GELU (`conv_frontend._centered_ln_gelu`: the variance in registers) and stores y (out_dtype) and the (B, T)
    statistics.
  * backward: grid (T-block groups, B). A program loops over consecutive T blocks; in each it recomputes u (the
    forward's code and tiles), the LayerNorm + GELU backward (`conv_frontend._ln_gelu_backward`:
    dz = dy gelu'(z) and du = rstd (dz w - mean_C(dz w) - x_hat mean_C(dz w x_hat))), and accumulates in registers
    sum_t dz x_hat and sum_t dz (the LayerNorm's parameter gradients), sum_t du (the conv bias's) and the conv
    weight's gradient du @ X^T (one tl.dot per block, precision as above: cuDNN's weight gradient reads a bf16 du
    under autocast). Each program writes one partial row per gradient; torch sums the rows in a fixed order: no
    float atomics, so the gradients are bitwise reproducible.
  * sm_90 (`tests/kernels/test_conv0.py -k sm90`, static SASS): the forward 57 registers (TF32) / 64 (IEEE), no
    spills, ~68 / 84 instructions per output value; the backward's (512, 16) tiles at 16 warps reach the
    128-register cap and spill ~130 B a thread (L1-resident), ~96 / 115 instructions per value: to time on a GPU.
  * out_dtype: the autocast dtype under autocast (what the conv would output), else x's dtype. The two-op path runs
    the conv in bf16 under autocast (x and w rounded to bf16, u rounded); here only y is rounded.
The waveform gets no gradient: where it requires one (or C > MAX_C, or the dtypes are not the conv's), the public
function runs the two-op path (`F.conv1d` + `channel_layer_norm_gelu`). A GroupNorm first block (extractor_mode
"group_norm") normalises each channel over time: its statistics need every frame before any output, so it cannot
fuse this way and keeps the conv + GroupNorm + GELU path (`models/feature_extractor.py`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from spidr_fast.kernels import _dispatch
from spidr_fast.kernels._utils import cdiv, fp32_uses_tf32, jit_in_place, kernel_out_dtype, next_pow2
from spidr_fast.kernels.conv_frontend import (
    _centered_ln_gelu,
    _empty,
    _erf,  # noqa: F401 (jitted here, as _gelu and _gelu_grad: the shared LayerNorm + GELU tile math calls them)
    _gelu,  # noqa: F401
    _gelu_grad,  # noqa: F401
    _ln_gelu_backward,
    channel_layer_norm_gelu,
    channel_layer_norm_gelu_ref,
)

MAX_C = 512  # whole columns live in registers: (512, 16) backward tiles; wider convs take the two-op path
# BLOCK_C * BLOCK_T elements; num_warps = tile / (32 * per_thread). Forward: 32 a thread -> 8 warps, 64 registers
# (tf32; ieee 128), no spills; 16 -> 16 warps: its column reductions cross twice the warps (51 vs 40 SASS an element).
FWD_TILE, FWD_PER_THREAD = 8192, 32
BWD_TILE, BWD_PER_THREAD = 8192, 16
PARTIAL_ROWS = 1024  # aim for about this many partial rows of each parameter gradient
MAX_ITERS = 64  # T blocks per backward program, at most

# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

# Plain functions here, `triton.jit`-decorated at the first launch (see `_utils.jit_in_place`); the LayerNorm + GELU
# tile math is conv_frontend.py's.
KERNELS = (
    "_erf",
    "_gelu",
    "_gelu_grad",
    "_centered_ln_gelu",
    "_ln_gelu_backward",
    "_conv_tile",
    "_wave_ln_gelu_fwd_kernel",
    "_wave_ln_gelu_bwd_kernel",
)

if TYPE_CHECKING:
    import triton.language as tl


def _conv_tile(
    x_ptr, cw_ptr, cb_ptr, cs, cmask, ts, tmask,
    K: tl.constexpr, KP: tl.constexpr, STRIDE: tl.constexpr, HAS_CONV_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, PADDED_W: tl.constexpr,
):  # fmt: skip
    """(u, X): u[c, t] = sum_j w[c, j] x[STRIDE t + j] (+ bias[c]) in fp32, 0 in rows c >= C (the bias too), as
    one (BLOCK_C, KP) @ (KP, BLOCK_T) tl.dot; X (KP, BLOCK_T) the waveform patches, 0 past K taps or T frames.
    cw_ptr: the (C, K) conv weight, or with PADDED_W, zero-padded to (BLOCK_C, KP) (`_centred_conv`): an unmasked,
    vectorised load (the forward's; in the backward's loop the masked load spills less)."""
    js = tl.arange(0, KP)
    jmask = js < K
    xt = tl.load(x_ptr + ts[None, :] * STRIDE + js[:, None], mask=jmask[:, None] & tmask[None, :], other=0.0)
    if PADDED_W:
        w = tl.load(cw_ptr + cs[:, None] * KP + js[None, :])
    else:
        w = tl.load(cw_ptr + cs[:, None] * K + js[None, :], mask=cmask[:, None] & jmask[None, :], other=0.0)
    xt = xt.to(tl.float32)
    u = tl.dot(w.to(tl.float32), xt, input_precision=DOT_PRECISION)
    if HAS_CONV_BIAS:
        u += tl.load(cb_ptr + cs, mask=cmask, other=0.0).to(tl.float32)[:, None]
    return u, xt


def _wave_ln_gelu_fwd_kernel(
    x_ptr, cw_ptr, cb_ptr, wm_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr,
    C, T, s_xb, s_yb, s_yc, s_yt, eps,
    K: tl.constexpr, KP: tl.constexpr, STRIDE: tl.constexpr, HAS_CONV_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """cw, cb: the conv's weight and bias centred over C (`_centred_conv`): the dot gives u - mean_C(u) directly
    (0 in the rows past C), no reduction for the mean and no mask; mean_C(u) = (wm_ptr[:KP], x patch) + wm_ptr[KP]."""
    pid_t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cs = tl.arange(0, BLOCK_C)
    cmask = cs < C
    ts = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = ts < T
    mask = cmask[:, None] & tmask[None, :]  # (BLOCK_C, BLOCK_T)
    xc, xt = _conv_tile(
        x_ptr + b * s_xb, cw_ptr, cb_ptr, cs, cmask, ts, tmask, K, KP, STRIDE, HAS_CONV_BIAS, DOT_PRECISION, True
    )
    mean = tl.sum(tl.load(wm_ptr + tl.arange(0, KP))[:, None] * xt, axis=0) + tl.load(wm_ptr + KP)
    w = tl.load(w_ptr + cs, mask=cmask, other=0.0).to(tl.float32) if HAS_WEIGHT else 0.0
    bias = tl.load(b_ptr + cs, mask=cmask, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
    y, rstd = _centered_ln_gelu(xc, C, w, bias, eps, HAS_WEIGHT, HAS_BIAS)
    y_ptrs = y_ptr + b * s_yb + cs.to(tl.int64)[:, None] * s_yc + ts[None, :] * s_yt
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + b * T + ts, mean, mask=tmask)
    tl.store(rstd_ptr + b * T + ts, rstd, mask=tmask)


def _wave_ln_gelu_bwd_kernel(
    x_ptr, cw_ptr, cb_ptr, w_ptr, b_ptr, dy_ptr, mean_ptr, rstd_ptr, dcw_ptr, dcb_ptr, dw_ptr, db_ptr,
    C, T, ITERS, s_xb, s_dyb, s_dyc, s_dyt,
    K: tl.constexpr, KP: tl.constexpr, STRIDE: tl.constexpr, HAS_CONV_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cs = tl.arange(0, BLOCK_C)
    cmask = cs < C
    js = tl.arange(0, KP)
    jmask = js < K
    x_ptr += b * s_xb
    dy_ptr += b * s_dyb  # int32 offsets within a batch row (C * T < 2**31)
    dcw_acc = tl.zeros((BLOCK_C, KP), tl.float32)
    dcb_acc = tl.zeros((BLOCK_C,), tl.float32)
    dw_acc = tl.zeros((BLOCK_C,), tl.float32)
    db_acc = tl.zeros((BLOCK_C,), tl.float32)
    w = tl.load(w_ptr + cs, mask=cmask, other=0.0).to(tl.float32) if HAS_WEIGHT else 0.0
    bias = tl.load(b_ptr + cs, mask=cmask, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
    for i in range(0, ITERS):  # consecutive T blocks; those past T are fully masked
        ts = (pid * ITERS + i) * BLOCK_T + tl.arange(0, BLOCK_T)
        tmask = ts < T
        mask = cmask[:, None] & tmask[None, :]
        u, xt = _conv_tile(
            x_ptr, cw_ptr, cb_ptr, cs, cmask, ts, tmask, K, KP, STRIDE, HAS_CONV_BIAS, DOT_PRECISION, False
        )
        dy = tl.load(dy_ptr + cs[:, None] * s_dyc + ts[None, :] * s_dyt, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + b * T + ts, mask=tmask, other=0.0)
        rstd = tl.load(rstd_ptr + b * T + ts, mask=tmask, other=0.0)
        # du is the LayerNorm input's gradient: nonzero in rows past C (never stored), 0 in columns past T
        du, dz, xhat = _ln_gelu_backward(u, dy, mean, rstd, C, w, bias, HAS_WEIGHT, HAS_BIAS)
        if HAS_WEIGHT:
            dw_acc += tl.sum(dz * xhat, axis=1)
        if HAS_BIAS:
            db_acc += tl.sum(dz, axis=1)
        dcb_acc += tl.sum(du, axis=1)
        # the conv weight's gradient: du (BLOCK_C, BLOCK_T) @ X (BLOCK_T, KP), X[t, j] = x[STRIDE t + j]
        dcw_acc = tl.dot(du, tl.trans(xt), dcw_acc, input_precision=DOT_PRECISION)
    row = b * tl.num_programs(0) + pid  # this program's partial row
    tl.store(dcw_ptr + row * C * K + cs[:, None] * K + js[None, :], dcw_acc, mask=cmask[:, None] & jmask[None, :])
    if HAS_CONV_BIAS:
        tl.store(dcb_ptr + row * C + cs, dcb_acc, mask=cmask)
    if HAS_WEIGHT:
        tl.store(dw_ptr + row * C + cs, dw_acc, mask=cmask)
    if HAS_BIAS:
        tl.store(db_ptr + row * C + cs, db_acc, mask=cmask)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def num_frames(samples: int, kernel_size: int, stride: int) -> int:
    return max(0, (samples - kernel_size) // stride + 1)


def _blocks(C: int, tile: int, per_thread: int) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_T, num_warps): whole columns, BLOCK_T >= 16 (the tl.dot's)."""
    block_c = max(16, next_pow2(C))
    block_t = max(16, tile // block_c)
    return block_c, block_t, max(1, min(16, block_c * block_t // (32 * per_thread)))


def conv_uses_tf32() -> bool:
    """torch's fp32 conv setting for cuDNN (TF32 or IEEE): `torch.backends.cudnn.conv`'s, else cudnn's, else the
    global one (`_utils.fp32_uses_tf32`, as `heads_ce.fp32_matmul_uses_tf32`)."""
    cudnn = torch.backends.cudnn
    return fp32_uses_tf32((getattr(cudnn, "conv", None), cudnn, torch.backends), cudnn)


def _dot_args(K: int, device: torch.device, out_dtype: torch.dtype) -> dict:
    """KP: the taps padded for tl.dot; TF32 on CUDA where the output is bf16/fp16 (autocast: the two-op path's conv
    runs in bf16, coarser than TF32, and y's own rounding dwarfs TF32's) or where cuDNN's fp32 convs would run TF32
    (`conv_uses_tf32`: PyTorch's default; the trainer turns it off, `train/env.py`); else IEEE fp32 (FFMA)."""
    tf32 = device.type == "cuda" and (out_dtype != torch.float32 or conv_uses_tf32())
    return {"KP": max(16, next_pow2(K)), "DOT_PRECISION": "tf32" if tf32 else "ieee"}


def _centred_conv(conv_weight: Tensor, conv_bias: Tensor | None, block_c: int, kp: int) -> tuple[Tensor, ...]:
    """The forward's conv operands, fp32: the (C, 1, K) weight minus its mean over C, zero-padded to a contiguous
    (block_c, kp) matrix (`_conv_tile` loads it unmasked); the bias minus its mean (or None); wm (kp + 1,): the
    weight's mean over C (0 past K), then the bias's mean (0 without one). u - mean_C(u) = centred weight @ patches
    + centred bias, and mean_C(u) = wm[:kp] @ patches + wm[kp]."""
    C, _, K = conv_weight.shape
    w = conv_weight.reshape(C, K).float()
    w_mean = w.mean(0)
    wc = F.pad(w - w_mean, (0, kp - K, 0, block_c - C)).contiguous()
    b_mean = conv_bias.float().mean().reshape(1) if conv_bias is not None else w.new_zeros(1)
    wm = torch.cat([F.pad(w_mean, (0, kp - K)), b_mean])
    return wc, (conv_bias.float() - b_mean if conv_bias is not None else None), wm


def _fwd_launch(
    x: Tensor,
    conv_weight: Tensor,
    conv_bias: Tensor | None,
    ln_weight: Tensor | None,
    ln_bias: Tensor | None,
    stride: int,
    eps: float,
    out_dtype: torch.dtype,
    channels_last: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    jit_in_place(globals(), KERNELS)
    B, S = x.shape
    C, _, K = conv_weight.shape
    T = num_frames(S, K, stride)
    x, conv_weight = x.contiguous(), conv_weight.contiguous()
    y = _empty(B, C, T, channels_last, dtype=kernel_out_dtype(out_dtype), device=x.device)
    mean = torch.empty((B, T), dtype=torch.float32, device=x.device)
    rstd = torch.empty((B, T), dtype=torch.float32, device=x.device)
    if B and C and T:
        block_c, block_t, num_warps = _blocks(C, FWD_TILE, FWD_PER_THREAD)
        dot_args = _dot_args(K, x.device, out_dtype)
        cw, cb, wm = _centred_conv(conv_weight, conv_bias, block_c, dot_args["KP"])
        _wave_ln_gelu_fwd_kernel[(cdiv(T, block_t), B)](
            x, cw, cb, wm, ln_weight, ln_bias, y, mean, rstd,
            C, T, x.stride(0), *y.stride(), eps,
            K=K, STRIDE=stride, HAS_CONV_BIAS=conv_bias is not None, HAS_WEIGHT=ln_weight is not None,
            HAS_BIAS=ln_bias is not None, BLOCK_C=block_c, BLOCK_T=block_t, **dot_args, num_warps=num_warps,
        )  # fmt: skip
    return y.to(out_dtype), mean, rstd


def _bwd_launch(
    grad_y: Tensor,
    x: Tensor,
    conv_weight: Tensor,
    conv_bias: Tensor | None,
    ln_weight: Tensor | None,
    ln_bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    stride: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    jit_in_place(globals(), KERNELS)
    B, C, T = grad_y.shape
    K = conv_weight.shape[2]
    x, conv_weight = x.contiguous(), conv_weight.contiguous()
    if grad_y.stride(1) != 1 and grad_y.stride(2) != 1:  # neither layout has a unit stride: one copy
        grad_y = grad_y.contiguous()
    block_c, block_t, num_warps = _blocks(C, BWD_TILE, BWD_PER_THREAD)
    n_tblocks = cdiv(T, block_t)
    # Few T blocks per program when B*T is small (enough programs to fill the GPU), up to MAX_ITERS when it is
    # large (bounded partial rows). A function of the shape only: reproducible sums.
    iters = max(1, min(MAX_ITERS, B * n_tblocks // PARTIAL_ROWS))
    n_prog = cdiv(n_tblocks, iters) if B and C and T else 0
    rows = B * n_prog

    def partial(shape: tuple[int, ...], present: bool) -> Tensor:
        return torch.zeros(shape if present else (0,), dtype=torch.float32, device=x.device)

    dcw_part = partial((rows, C, K), True)
    dcb_part = partial((rows, C), conv_bias is not None)
    dw_part = partial((rows, C), ln_weight is not None)
    db_part = partial((rows, C), ln_bias is not None)
    if n_prog:
        dot_args = _dot_args(K, x.device, grad_y.dtype)
        _wave_ln_gelu_bwd_kernel[(n_prog, B)](
            x, conv_weight, conv_bias, ln_weight, ln_bias, grad_y, mean, rstd, dcw_part, dcb_part, dw_part, db_part,
            C, T, iters, x.stride(0), *grad_y.stride(),
            K=K, STRIDE=stride, HAS_CONV_BIAS=conv_bias is not None, HAS_WEIGHT=ln_weight is not None,
            HAS_BIAS=ln_bias is not None, BLOCK_C=block_c, BLOCK_T=block_t, **dot_args,
            num_warps=num_warps,
        )  # fmt: skip

    # fixed-order reductions of the per-program partial rows (an empty sum is zeros: T = 0)
    def total(part: Tensor, like: Tensor | None) -> Tensor:
        return part.view(rows, *like.shape).sum(0).to(like.dtype) if like is not None else x.new_empty(0)

    return total(dcw_part, conv_weight), total(dcb_part, conv_bias), total(dw_part, ln_weight), total(db_part, ln_bias)


# --------------------------------------------------------------------------------------------
# Custom ops + autograd
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("spidr_fast::conv0_layer_norm_gelu", mutates_args=())
def _conv0_op(
    x: Tensor,
    conv_weight: Tensor,
    conv_bias: Tensor | None,
    ln_weight: Tensor | None,
    ln_bias: Tensor | None,
    stride: int,
    eps: float,
    out_dtype: torch.dtype,
    channels_last: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, rstd); y (B, C, T) channels-last or contiguous; mean and rstd (B, T) fp32 for the backward."""
    return _fwd_launch(x, conv_weight, conv_bias, ln_weight, ln_bias, stride, eps, out_dtype, channels_last)


@_conv0_op.register_fake
def _(
    x: Tensor,
    conv_weight: Tensor,
    conv_bias: Tensor | None,
    ln_weight: Tensor | None,
    ln_bias: Tensor | None,
    stride: int,
    eps: float,
    out_dtype: torch.dtype,
    channels_last: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    B, S = x.shape
    C, _, K = conv_weight.shape
    T = num_frames(S, K, stride)
    f32 = torch.float32
    y = _empty(B, C, T, channels_last, dtype=out_dtype, device=x.device)
    return y, x.new_empty((B, T), dtype=f32), x.new_empty((B, T), dtype=f32)


@torch.library.custom_op("spidr_fast::conv0_layer_norm_gelu_backward", mutates_args=())
def _conv0_backward_op(
    grad_y: Tensor,
    x: Tensor,
    conv_weight: Tensor,
    conv_bias: Tensor | None,
    ln_weight: Tensor | None,
    ln_bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    stride: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_conv_weight, grad_conv_bias, grad_ln_weight, grad_ln_bias); an absent one gets an empty (0,) tensor."""
    return _bwd_launch(grad_y, x, conv_weight, conv_bias, ln_weight, ln_bias, mean, rstd, stride)


@_conv0_backward_op.register_fake
def _(
    grad_y: Tensor,
    x: Tensor,
    conv_weight: Tensor,
    conv_bias: Tensor | None,
    ln_weight: Tensor | None,
    ln_bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    stride: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(torch.empty_like(t) if t is not None else x.new_empty(0) for t in (conv_weight, conv_bias, ln_weight,
                                                                                   ln_bias))  # fmt: skip


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    x, conv_weight, conv_bias, ln_weight, ln_bias, stride, *_ = inputs
    ctx.stride = stride
    ctx.present = [t is not None for t in (conv_bias, ln_weight, ln_bias)]
    ctx.save_for_backward(x, conv_weight, conv_bias, ln_weight, ln_bias, output[1], output[2])


def _backward(ctx, grad_y: Tensor, grad_mean: Tensor | None, grad_rstd: Tensor | None) -> tuple:
    # mean and rstd are statistics (the public function returns only y); the waveform gets no gradient (the public
    # function takes the two-op path when it requires one)
    x, conv_weight, conv_bias, ln_weight, ln_bias, mean, rstd = ctx.saved_tensors
    grads = _conv0_backward_op(grad_y, x, conv_weight, conv_bias, ln_weight, ln_bias, mean, rstd, ctx.stride)
    optional = [g if present else None for g, present in zip(grads[1:], ctx.present)]
    return None, grads[0], *optional, None, None, None, None


_conv0_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public function (dispatch: Triton where it runs, else the two-op path)
# --------------------------------------------------------------------------------------------


def conv0_layer_norm_gelu(
    x: Tensor,
    conv_weight: Tensor,
    conv_bias: Tensor | None,
    ln_weight: Tensor | None,
    ln_bias: Tensor | None,
    stride: int,
    eps: float = 1e-5,
    *,
    channels_last: bool | None = None,
) -> Tensor:
    """gelu(channel LayerNorm(conv1d(x[:, None], conv_weight, conv_bias, stride))), exact erf GELU.

    Args:
        x: (B, S) waveforms, fp32/bf16/fp16. Differentiable only through the two-op path (taken when x requires
            a gradient).
        conv_weight: (C, 1, K); conv_bias: (C,) or None. The Conv1d's (no padding, no dilation).
        ln_weight, ln_bias: (C,) LayerNorm scale and shift, or None.
        stride: the conv's stride. eps: added to the variance, as in `nn.LayerNorm`.
        channels_last: the output layout, (B, C, T) stored as (B, T, C) when True; contiguous when False or None
            (on the two-op path, None gives the conv output's layout). Values never depend on it.

    Returns:
        (B, C, T), T = max(0, (S - K) // stride + 1) (the two-op path's F.conv1d refuses S < K): the autocast dtype
        under autocast, else x's dtype.
        Differentiable in conv_weight, conv_bias, ln_weight, ln_bias (and x, on the two-op path).
    """
    if x.dim() != 2 or conv_weight.dim() != 3 or conv_weight.shape[1] != 1:
        raise ValueError(
            f"x must be (B, S) and conv_weight (C, 1, K), got {tuple(x.shape)}, {tuple(conv_weight.shape)}"
        )
    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    out_dtype = torch.get_autocast_dtype(device) if autocast else x.dtype
    C, _, K = conv_weight.shape
    fusible = (
        not x.requires_grad
        and C <= MAX_C
        and C * num_frames(x.shape[1], K, stride) < 2**31  # the kernels' int32 offsets within a row
        and (autocast or conv_weight.dtype == x.dtype)  # else F.conv1d's own dtype error
    )
    if fusible and _dispatch.use_fused(x.device, "conv0"):
        out = _conv0_op(x, conv_weight, conv_bias, ln_weight, ln_bias, stride, eps, out_dtype, bool(channels_last))
        return out[0]
    u = F.conv1d(x.unsqueeze(1), conv_weight, conv_bias, stride)
    return channel_layer_norm_gelu(u, ln_weight, ln_bias, eps, channels_last=channels_last)


def conv0_layer_norm_gelu_ref(
    x: Tensor,
    conv_weight: Tensor,
    conv_bias: Tensor | None,
    ln_weight: Tensor | None,
    ln_bias: Tensor | None,
    stride: int,
    eps: float = 1e-5,
) -> Tensor:
    """Reference: Conv1d, then the model's ChannelLayerNorm (transpose, LayerNorm, transpose) and exact GELU."""
    return channel_layer_norm_gelu_ref(
        F.conv1d(x.unsqueeze(1), conv_weight, conv_bias, stride), ln_weight, ln_bias, eps
    )
