"""Channel LayerNorm + exact GELU of a (B, C, T) conv output, in one pass over memory.

Inputs and outputs (B batch, C channels, T frames):
    x       (B, C, T) fp32/bf16/fp16   a Conv1d output, contiguous or channels-last (else copied once)
    weight  (C,) | None, bias (C,) | None   the LayerNorm's affine parameters (any float dtype)
    y       (B, C, T) x.dtype          gelu(layer_norm over C of every (b, t) column), exact erf GELU,
                                       channels-last or contiguous as asked (the model asks channels-last
                                       on CUDA: the next conv's cuDNN NHWC kernels read it untransposed)
    mean, rstd (B, T) fp32             per-column statistics, kept for the backward

Why: the feature extractor's first block writes ~760k frames x 512 channels per step; the
reference runs transpose -> LayerNorm -> transpose -> GELU over it (each a full read and write,
in fp32 under autocast). Here x is read once and y written once, in x's own layout: no transposes.

Fused path (Triton):
  * forward: grid (T blocks, B). A program loads a (BLOCK_C, BLOCK_T) tile (whole columns: C <=
    MAX_C; rows along T, or whole columns when channels-last, are contiguous in memory, so loads
    coalesce), computes the column mean and
    variance in fp32 (two-pass, in registers), normalises, applies the affine and GELU, and stores
    y in x's dtype plus the (B, T) fp32 mean and rstd (8 bytes per frame). Both layouts are addressed
    by strides (each tile is whole columns, so both coalesce).
  * backward: grid (T-block groups, B), on dense x and dy, each contiguous or channels-last (a copy
    only for the positional conv's sliced output); dx takes x's layout. A program loops over
    consecutive T blocks; in each it recomputes x_hat and z = x_hat w + b from x and the saved
    statistics, forms dz = dy gelu'(z), writes
    dx = rstd (dz w - mean_C(dz w) - x_hat mean_C(dz w x_hat)), and accumulates sum_t dz x_hat and
    sum_t dz over its T blocks in registers. Each program writes one (C,) partial row for
    grad_weight and grad_bias; torch sums the rows in a fixed order: no float atomics, so the
    gradients are bitwise reproducible.
Math is fp32 for every input dtype (bf16/fp16 converted after the load, stored back rounded).
Under autocast, the custom op runs in x's dtype (the reference's LayerNorm would output fp32): the
next conv rounds its input to the autocast dtype anyway, so only the last block's output differs
by one rounding. The reference below is the CPU path and the ground truth for the kernels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from spidr_fast.kernels import _dispatch
from spidr_fast.kernels._utils import cdiv, jit_in_place, kernel_out_dtype, next_pow2

MAX_C = 1024  # whole columns live in registers; wider inputs take the reference path
# Tile sizes from register counts of the sm_90 cubins (cuobjdump --dump-resource-usage, triton 3.9;
# not yet timed on a GPU), channels-last at C = 512. Forward: 32 elements per thread -> 4 warps, 76 registers,
# no spills (16 -> 8 warps, 48 registers, but its column reductions cross twice the warps: 45.5 vs 41.0 SASS
# instructions an element, bench/sass_per_element.py). Backward: 8 per thread -> 74 registers (16 -> 128).
FWD_TILE, FWD_PER_THREAD = 4096, 32  # BLOCK_C * BLOCK_T elements; num_warps = tile / (32 * per_thread)
BWD_TILE, BWD_PER_THREAD = 4096, 8
MAX_BLOCK_T = 128
PARTIAL_ROWS = 1024  # aim for about this many (C,) partial rows of grad_weight/grad_bias (4 KB each at C=1024)
MAX_ITERS = 16  # T blocks per backward program, at most

# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

# Plain functions here, `triton.jit`-decorated at the first launch (see `_utils.jit_in_place`).
KERNELS = ("_erf", "_gelu", "_gelu_grad", "_ln_gelu", "_centered_ln_gelu", "_ln_gelu_backward",
           "_cln_gelu_fwd_kernel", "_cln_gelu_bwd_kernel")  # fmt: skip

if TYPE_CHECKING:
    import triton.language as tl


def _erf(x):
    """erf of an fp32 tensor: the operations of libdevice's `__nv_erff` (what `tl.math.erf` calls; its constants as
    triton's PTX shows them), with its two polynomials both evaluated on immediate coefficients and the result
    selected. libdevice evaluates one polynomial on coefficients selected per element, which costs a register move
    per coefficient (~13 of its ~31 SASS instructions an element). |x| < 1.00296: x + x p(x^2); else
    sign(x) (1 - 2^(-|x| - |x| q(|x|))): libdevice's values (its error: 2 ulp), except subnormal x, which
    libdevice's flush-to-zero fmas map to 0 and these to x (1 + p(0))."""
    a = tl.abs(x)
    t = x * x
    p = tl.fma(t, 8.483494457323104e-05, -0.0008213091641664505)
    p = tl.fma(p, t, 0.005213488824665546)
    p = tl.fma(p, t, -0.026868773624300957)
    p = tl.fma(p, t, 0.11284004896879196)
    p = tl.fma(p, t, -0.37612664699554443)
    p = tl.fma(p, t, 0.12837915122509003)
    q = tl.fma(a, 0.00011219871521461755, -0.0013275252422317863)
    q = tl.fma(q, a, 0.00839653518050909)
    q = tl.fma(q, a, -0.04024658352136612)
    q = tl.fma(q, a, 0.15950430929660797)
    q = tl.fma(q, a, 0.9129176735877991)
    q = tl.fma(q, a, 0.6290600299835205)
    tail = 1.0 - tl.math.exp2(tl.fma(q, -a, -a))
    return tl.where(a >= 1.002959966659546, tl.where(x < 0.0, -tail, tail), tl.fma(p, x, x))


def _gelu(z):
    """Exact GELU of an fp32 tensor (shared with `pos_conv.py`)."""
    return 0.5 * z * (1.0 + _erf(z * 0.7071067811865476))


def _gelu_grad(z):
    """gelu'(z) = Phi(z) + z phi(z) of an fp32 tensor (shared with `pos_conv.py`)."""
    s = z * 0.7071067811865476
    cdf = 0.5 * (1.0 + _erf(s))
    # phi(z) = exp(-s^2) / sqrt(2 pi), as exp2 (tl.exp adds a multiply and a subnormal fix-up); s * s is _erf's
    pdf = tl.math.exp2(s * s * -1.4426950408889634) * 0.3989422804014327
    return cdf + z * pdf


def _ln_gelu(x, mask, C, w, bias, eps, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_C: tl.constexpr):
    """(y, mean, rstd): gelu(LayerNorm over axis 0) of an fp32 (BLOCK_C, BLOCK_T) tile of whole columns, 0 in the
    rows past C (`mask`: False there; unread when EVEN_C, C == BLOCK_C); w, bias (BLOCK_C,) fp32 (unused without
    HAS_WEIGHT / HAS_BIAS)."""
    mean = tl.sum(x, axis=0) / C  # (BLOCK_T,)
    xc = x - mean[None, :]
    if not EVEN_C:  # rows past C (0 in x) out of the variance; other columns are independent
        xc = tl.where(mask, xc, 0.0)
    y, rstd = _centered_ln_gelu(xc, C, w, bias, eps, HAS_WEIGHT, HAS_BIAS)
    return y, mean, rstd


def _centered_ln_gelu(xc, C, w, bias, eps, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """(y, rstd) of `_ln_gelu` from the tile already centred over axis 0 (0 in the rows past C). Shared with
    `conv0.py`, whose conv computes the centred tile directly."""
    var = tl.sum(xc * xc, axis=0) / C  # biased, as LayerNorm's
    rstd = tl.math.rsqrt(var + eps)
    z = xc * rstd[None, :]
    if HAS_WEIGHT:
        z = z * w[:, None]
    if HAS_BIAS:
        z = z + bias[:, None]
    return _gelu(z), rstd


def _ln_gelu_backward(x, dy, mean, rstd, C, w, bias, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """(dx, dz, x_hat) of `_ln_gelu` for a tile with its saved statistics (0 past T) and dy (0 past C and T, x finite
    there: so is x_hat, and dz is 0): dx the input's gradient (to be masked), dz the LayerNorm output's (sum_t dz x_hat
    and sum_t dz: the affine's)."""
    xhat = (x - mean[None, :]) * rstd[None, :]  # finite past C and T, where dz = 0: no mask needed
    z = xhat
    if HAS_WEIGHT:
        z = z * w[:, None]
    if HAS_BIAS:
        z = z + bias[:, None]
    dz = dy * _gelu_grad(z)
    dxhat = dz
    if HAS_WEIGHT:
        dxhat = dz * w[:, None]
    c1 = tl.sum(dxhat * xhat, axis=0) / C  # (BLOCK_T,)
    c2 = tl.sum(dxhat, axis=0) / C
    dx = (dxhat - (xhat * c1[None, :] + c2[None, :])) * rstd[None, :]
    return dx, dz, xhat


def _cln_gelu_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr,
    C, T, s_xb, s_xc, s_xt, s_yb, s_yc, s_yt, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
    EVEN_C: tl.constexpr,
):  # fmt: skip
    pid_t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cs = tl.arange(0, BLOCK_C)
    cmask = cs < C
    ts = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = ts < T
    mask = cmask[:, None] & tmask[None, :]  # (BLOCK_C, BLOCK_T)
    x = tl.load(x_ptr + b * s_xb + cs.to(tl.int64)[:, None] * s_xc + ts[None, :] * s_xt, mask=mask, other=0.0)
    x = x.to(tl.float32)  # bf16/fp16 converted before any math (also what the interpreter needs)
    w = tl.load(w_ptr + cs, mask=cmask, other=0.0).to(tl.float32) if HAS_WEIGHT else 0.0
    bias = tl.load(b_ptr + cs, mask=cmask, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
    y, mean, rstd = _ln_gelu(x, mask, C, w, bias, eps, HAS_WEIGHT, HAS_BIAS, EVEN_C)
    y_ptrs = y_ptr + b * s_yb + cs.to(tl.int64)[:, None] * s_yc + ts[None, :] * s_yt
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + b * T + ts, mean, mask=tmask)
    tl.store(rstd_ptr + b * T + ts, rstd, mask=tmask)


def _cln_gelu_bwd_kernel(
    x_ptr, w_ptr, b_ptr, dy_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_ptr, db_ptr,
    C, T, ITERS, s_xb, s_xc, s_xt, s_dyb, s_dyc, s_dyt,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cs = tl.arange(0, BLOCK_C)
    cmask = cs < C
    # x and dx share one dense layout, dy has its own (channels-first or channels-last each): int32 offsets
    # within a batch row (C * T < 2**31)
    x_ptr += b * s_xb
    dy_ptr += b * s_dyb
    dx_ptr += b * s_xb
    w = tl.load(w_ptr + cs, mask=cmask, other=0.0).to(tl.float32) if HAS_WEIGHT else 0.0
    bias = tl.load(b_ptr + cs, mask=cmask, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
    # per-element partial sums over the T blocks, reduced over T once after the loop (a reduction over T in
    # every iteration crosses warps: shared memory and barriers)
    dw_acc = tl.zeros((BLOCK_C, BLOCK_T), tl.float32)
    db_acc = tl.zeros((BLOCK_C, BLOCK_T), tl.float32)
    for i in range(0, ITERS):  # consecutive T blocks; those past T are fully masked
        ts = (pid * ITERS + i) * BLOCK_T + tl.arange(0, BLOCK_T)
        tmask = ts < T
        mask = cmask[:, None] & tmask[None, :]
        offs = cs[:, None] * s_xc + ts[None, :] * s_xt
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + cs[:, None] * s_dyc + ts[None, :] * s_dyt, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + b * T + ts, mask=tmask, other=0.0)
        rstd = tl.load(rstd_ptr + b * T + ts, mask=tmask, other=0.0)
        dx, dz, xhat = _ln_gelu_backward(x, dy, mean, rstd, C, w, bias, HAS_WEIGHT, HAS_BIAS)
        if HAS_WEIGHT:
            dw_acc += dz * xhat
        if HAS_BIAS:
            db_acc += dz
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    row = b * tl.num_programs(0) + pid  # this program's partial row
    if HAS_WEIGHT:
        tl.store(dw_ptr + row * C + cs, tl.sum(dw_acc, axis=1), mask=cmask)
    if HAS_BIAS:
        tl.store(db_ptr + row * C + cs, tl.sum(db_acc, axis=1), mask=cmask)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def is_channels_last(t: Tensor) -> bool:
    """(B, C, T) stored as (B, T, C): unit stride along C (what cuDNN's NHWC kernels read and write)."""
    B, C, T = t.shape
    return C > 1 and T > 1 and t.stride(1) == 1 and t.stride(2) == C and (B <= 1 or t.stride(0) == C * T)


def _dense(t: Tensor) -> Tensor:
    """t itself when it is contiguous or channels-last (one dense layout the kernels address by strides), else
    a contiguous copy (e.g. the positional conv's sliced output)."""
    return t if t.is_contiguous() or is_channels_last(t) else t.contiguous()


def _empty(B: int, C: int, T: int, channels_last: bool, **kw: object) -> Tensor:
    return torch.empty((B, T, C), **kw).transpose(1, 2) if channels_last else torch.empty((B, C, T), **kw)


def _blocks(C: int, T: int, tile: int, per_thread: int) -> tuple[int, int, int]:
    block_c = next_pow2(C)
    block_t = max(1, min(MAX_BLOCK_T, tile // block_c, next_pow2(T)))
    num_warps = max(1, min(16, block_c * block_t // (32 * per_thread)))
    return block_c, block_t, num_warps


def _fwd_launch(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, channels_last: bool
) -> tuple[Tensor, Tensor, Tensor]:
    jit_in_place(globals(), KERNELS)
    B, C, T = x.shape
    x = _dense(x)
    y = _empty(B, C, T, channels_last, dtype=kernel_out_dtype(x.dtype), device=x.device)
    mean = torch.empty((B, T), dtype=torch.float32, device=x.device)
    rstd = torch.empty((B, T), dtype=torch.float32, device=x.device)
    if B and C and T:
        block_c, block_t, num_warps = _blocks(C, T, FWD_TILE, FWD_PER_THREAD)
        _cln_gelu_fwd_kernel[(cdiv(T, block_t), B)](
            x, weight, bias, y, mean, rstd,
            C, T, *x.stride(), *y.stride(), eps,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BLOCK_C=block_c, BLOCK_T=block_t,
            EVEN_C=block_c == C, num_warps=num_warps,
        )  # fmt: skip
    return y.to(x.dtype), mean, rstd


def _bwd_launch(
    grad_y: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    jit_in_place(globals(), KERNELS)
    B, C, T = x.shape
    x, grad_y = _dense(x), _dense(grad_y)  # no-ops for a conv output and its usual gradient
    grad_x = _empty(B, C, T, is_channels_last(x), dtype=kernel_out_dtype(x.dtype), device=x.device)
    block_c, block_t, num_warps = _blocks(C, T, BWD_TILE, BWD_PER_THREAD)
    n_tblocks = cdiv(T, block_t)
    # Few T blocks per program when B*T is small (enough programs to fill the GPU), up to MAX_ITERS
    # when it is large (bounded partial rows). A function of the shape only: reproducible sums.
    iters = max(1, min(MAX_ITERS, B * n_tblocks // PARTIAL_ROWS))
    n_prog = cdiv(n_tblocks, iters) if B and C and T else 0
    f32 = torch.float32
    dw_part = torch.zeros((B * n_prog, C) if weight is not None else (0,), dtype=f32, device=x.device)
    db_part = torch.zeros((B * n_prog, C) if bias is not None else (0,), dtype=f32, device=x.device)
    if n_prog:
        _cln_gelu_bwd_kernel[(n_prog, B)](
            x, weight, bias, grad_y, mean, rstd, grad_x, dw_part, db_part,
            C, T, iters, *x.stride(), *grad_y.stride(),
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BLOCK_C=block_c, BLOCK_T=block_t,
            num_warps=num_warps,
        )  # fmt: skip
    # fixed-order reductions of the per-program partial rows (an empty sum is zeros: T = 0)
    grad_w = dw_part.view(-1, C).sum(0).to(weight.dtype) if weight is not None else x.new_empty(0)
    grad_b = db_part.view(-1, C).sum(0).to(bias.dtype) if bias is not None else x.new_empty(0)
    return grad_x.to(x.dtype), grad_w, grad_b


# --------------------------------------------------------------------------------------------
# Custom ops + autograd
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("spidr_fast::channel_layer_norm_gelu", mutates_args=())
def _cln_gelu_op(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, channels_last: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, rstd); y channels-last or contiguous; mean and rstd (B, T) fp32 are kept for the backward."""
    return _fwd_launch(x, weight, bias, eps, channels_last)


@_cln_gelu_op.register_fake
def _(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, channels_last: bool
) -> tuple[Tensor, Tensor, Tensor]:
    B, C, T = x.shape
    f32 = torch.float32
    y = _empty(B, C, T, channels_last, dtype=x.dtype, device=x.device)
    return y, x.new_empty((B, T), dtype=f32), x.new_empty((B, T), dtype=f32)


@torch.library.custom_op("spidr_fast::channel_layer_norm_gelu_backward", mutates_args=())
def _cln_gelu_backward_op(
    grad_y: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight, grad_bias); an absent weight or bias gets an empty (0,) gradient."""
    return _bwd_launch(grad_y, x, weight, bias, mean, rstd)


@_cln_gelu_backward_op.register_fake
def _(
    grad_y: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    grad_w = torch.empty_like(weight) if weight is not None else x.new_empty(0)
    grad_b = torch.empty_like(bias) if bias is not None else x.new_empty(0)
    B, C, T = x.shape
    return _empty(B, C, T, is_channels_last(_dense(x)), dtype=x.dtype, device=x.device), grad_w, grad_b


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    x, weight, bias, _, _ = inputs
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
    ctx.save_for_backward(x, weight, bias, output[1], output[2])


def _backward(ctx, grad_y: Tensor, grad_mean: Tensor | None, grad_rstd: Tensor | None) -> tuple:
    # mean and rstd are statistics (the public function returns only y): no gradient flows from them
    x, weight, bias, mean, rstd = ctx.saved_tensors
    grad_x, grad_w, grad_b = _cln_gelu_backward_op(grad_y, x, weight, bias, mean, rstd)
    return grad_x, grad_w if ctx.has_weight else None, grad_b if ctx.has_bias else None, None, None


_cln_gelu_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public function (dispatch: Triton where it runs, else the reference)
# --------------------------------------------------------------------------------------------


def channel_layer_norm_gelu(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    channels_last: bool | None = None,
) -> Tensor:
    """gelu(LayerNorm over the channels of x), exact erf GELU, without transposing x.

    Args:
        x: (B, C, T) fp32/bf16/fp16, e.g. a Conv1d output. Contiguous or channels-last (unit stride along C)
            avoids a copy.
        weight: (C,) LayerNorm scale, or None (no scale).
        bias: (C,) LayerNorm shift, or None (no shift).
        eps: added to the variance, as in `nn.LayerNorm`.
        channels_last: the fused path's output layout: (B, C, T) stored as (B, T, C) when True, contiguous
            when False, x's when None. Values never depend on it (the reference's output is channels-last).

    Returns:
        (B, C, T) in x's dtype. Differentiable in x, weight, bias. Math in fp32.
    """
    if x.dim() != 3:
        raise ValueError(f"x must have shape (B, C, T), got {tuple(x.shape)}")
    if x.shape[1] * x.shape[2] >= 2**31:  # beyond the backward kernel's int32 offsets
        return channel_layer_norm_gelu_ref(x, weight, bias, eps)
    if _dispatch.use_fused(x.device, "conv_frontend") and x.shape[1] <= MAX_C:
        if channels_last is None:
            channels_last = is_channels_last(x)
        return _cln_gelu_op(x, weight, bias, eps, channels_last)[0]
    return channel_layer_norm_gelu_ref(x, weight, bias, eps)


def channel_layer_norm_gelu_ref(
    x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5
) -> Tensor:
    """Reference: the model's ChannelLayerNorm (transpose, LayerNorm, transpose) then exact GELU."""
    # (B, C, T) -> (B, T, C) -> LayerNorm over C -> (B, C, T)
    return F.gelu(F.layer_norm(x.transpose(1, 2), (x.shape[1],), weight, bias, eps).transpose(1, 2))
