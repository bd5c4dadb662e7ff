"""One layer of the encoder's positional embedding: grouped conv + channel LayerNorm + exact GELU + padding mask.

Inputs and outputs (B batch, T frames, D channels in G groups of Cg = D / G, k taps):
    x       (B, T, D) fp32/bf16/fp16   the layer's input, channels-last: the encoder's own layout
    keep    (B, T) bool | None         True on real frames; padded frames read as zero and are written as zero
    weight  (D, Cg, k), bias (D,) | None   the layer's nn.Conv1d parameters (the public function casts them to
                                       the compute dtype, as autocast casts a conv's)
    y       (B, T, D) x.dtype          keep * gelu(layer_norm over D of (conv(keep * x) + bias)), LayerNorm
                                       without affine, exact erf GELU; `depth` of these are the module
                                       (keep is 0/1: masking an already-masked input changes nothing)
    u       (B, T, D) x.dtype          the pre-norm conv output, kept for the backward
    mean, rstd (B, T) fp32             its per-frame statistics, kept for the backward
Output frame t reads input frames t + j - k // 2, j in [0, k), for odd and even k alike (nn.Conv1d with
padding k // 2 gives an even kernel one frame too many; the module drops the last one).

Why (B, T, D): it is the encoder's residual-stream layout, so the module's transposes at entry and
exit go; a group's Cg channels of one frame are one contiguous run (coalesced loads of every tap's
rows), the LayerNorm reduces each frame along its contiguous dim, and one layer's output is the next
one's input without a copy.

Fused path (Triton):
  * forward, `_pos_conv_kernel` (NORM): grid (T blocks, B). A program owns BLOCK_T frames x all D
    channels. Per group: the implicit-GEMM conv, one tl.dot per tap ((BLOCK_T, Cg) rows shifted by the
    tap, masked outside [0, T) and on padded frames, times the tap's (Cg, Cg) weight block; Cg padded to
    a power of two >= 16 with masks), plus the bias, into an fp32 accumulator; u is stored and the
    per-frame mean and M2 updated (per-group mean and M2 merged by Chan et al.'s rule: no E[u^2] - E[u]^2
    cancellation). After a block barrier a second loop, over (BLOCK_T, BLOCK_D_NORM) chunks of the frames
    (no padded group lanes), re-reads the program's own u tile (just written: L2-resident), normalises, applies
    GELU and keep, and writes y. Each frame's input-tap validity (in range, kept) is packed once into an int32.
  * backward: three launches.
    1. `_pos_conv_ln_gelu_bwd_kernel`: dz = keep * LayerNorm-GELU backward of dy at u (whole frames of D channels,
       in two power-of-two parts: 512 + 256 at D = 768).
    2. `_pos_conv_kernel` (not NORM) on dz with the transposed, tap-flipped weight: input frame s gets
       sum_j W_j^T dz[s - j + k//2] = sum_j' W'_j' dz[s + j' - (k - 1 - k//2)], the forward's form with
       the offset k - 1 - k//2 (k//2 for odd k, k/2 - 1 for even k); times keep: grad_x.
    3. `_pos_conv_dw_kernel`: grid (tap, group, frame chunk); a program accumulates dz^T x (shifted by
       its tap, through the same keep mask) over its chunk's frames in fp32 and writes one partial
       (Cg, Cg) block; torch sums the chunks in a fixed order, and the bias gradient is its sum over dz.
    Kept from the forward: x (alive anyway: the previous layer's output), u (written by the forward in
    any case, as its pass-2 scratch: keeping it costs memory, not traffic; recomputing it would be a
    second conv), mean and rstd (8 bytes per frame).
    Weight gradient in Triton, not `aten.convolution_backward`: cuDNN would need x * keep materialised
    (the first layer's input is unmasked) and, for even k, dz padded by one frame (two copies), its
    grouped kernels are the 15%-of-peak class this op exists to leave, and the chunked partials here
    make the sums deterministic.
Math: fp32 accumulation; bf16/fp16 dots on tensor cores (fp32 dots under the interpreter, which cannot
run bf16 ones); fp32 inputs take TF32 when cuDNN's convs would (`torch.backends.cudnn.allow_tf32`).
The reference below (cuDNN conv + `channel_layer_norm_gelu`) is the CPU path and the ground truth.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from spidr_fast.kernels import _dispatch
from spidr_fast.kernels._utils import cdiv, dot_in_fp32, jit_in_place, kernel_out_dtype, next_pow2
from spidr_fast.kernels.conv0 import conv_uses_tf32
from spidr_fast.kernels.conv_frontend import (
    _erf,  # noqa: F401 (jitted here: `_gelu`, `_gelu_grad` call it)
    _gelu,
    _gelu_grad,
    channel_layer_norm_gelu,
)

MAX_CG = 64  # channels per group the (Cg, Cg) weight blocks take in registers; wider groups: the reference
MAX_D = 1024  # whole frames in the LayerNorm-GELU backward's registers; wider: the reference
# Tiles: not yet timed on a GPU (`make gpu-check` runs bench/test_bench_pos_conv.py). Every forward program
# reads all G * k weight blocks once (L2), so frames per program trade weight traffic against programs:
# 64 frames give ~190 programs for a base step's ~12k frames per GPU.
BLOCK_T_CONV = 64
NUM_WARPS_CONV = 4
BLOCK_D_NORM = 64  # channels per chunk of the forward's LayerNorm + GELU pass (whole frames, not padded groups)
BLOCK_T_DW = 64  # frames per tl.dot of the weight gradient (its reduction dim)
DW_PROGRAMS = 2048  # aim for about this many weight-gradient programs (partials: chunks x D x Cg x k x 4 bytes)
# LayerNorm-GELU backward: BLOCK_T = BWD_TILE // next_pow2(D) frames a program, ~BWD_PER_THREAD channels of them a
# thread (warps a power of two: 4 at D = 768, 24 a thread, 72 registers; 16 warps cost more shuffles and barriers)
BWD_TILE, BWD_PER_THREAD = 4096, 16

# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

# Plain functions here, `triton.jit`-decorated at the first launch (see `_utils.jit_in_place`).
KERNELS = ("_erf", "_gelu", "_gelu_grad", "_gelu_norm_grad", "_pos_conv_kernel", "_pos_conv_ln_gelu_bwd_kernel",
           "_pos_conv_dw_kernel")  # fmt: skip

if TYPE_CHECKING:
    import triton.language as tl


def _pos_conv_kernel(
    x_ptr, keep_ptr, w_ptr, bias_ptr, out_ptr, u_ptr, mean_ptr, rstd_ptr,
    T, D, G, CG, eps,
    K: tl.constexpr, PAD: tl.constexpr, NORM: tl.constexpr, MASK_IN: tl.constexpr, MASK_OUT: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """out[t] = keep[t] * f(sum_j W_j^T (keep * x)[t + j - PAD] + bias), f = GELU(LayerNorm_D) when NORM.
    w: (G, K, Cg_in, Cg_out) contiguous. int32 offsets within a batch row (T * D < 2**31)."""
    pid_t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    ts = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = ts < T
    cs = tl.arange(0, BLOCK_C)
    cmask = cs < CG
    x_ptr += b * T * D
    out_ptr += b * T * D
    if MASK_IN or MASK_OUT:
        keep_ptr += b * T
    w_offs = cs[:, None] * CG + cs[None, :]  # (c_in, c_out) within one (group, tap) block
    wmask = cmask[:, None] & cmask[None, :]
    omask = tmask[:, None] & cmask[None, :]
    if MASK_OUT:
        keep_t = tl.load(keep_ptr + ts, mask=tmask, other=0).to(tl.float32)
    if NORM:
        u_ptr += b * T * D
        mean = tl.zeros((BLOCK_T,), tl.float32)
        m2 = tl.zeros((BLOCK_T,), tl.float32)
    if K <= 31:
        # bit j of a frame's valid: its input frame t + j - PAD is in [0, T) (and kept): computed once, not per group
        valid = tl.zeros((BLOCK_T,), tl.int32)
        for tap in tl.static_range(K):
            tap_src = ts + (tap - PAD)
            ok = (tap_src >= 0) & (tap_src < T)
            if MASK_IN:
                ok &= tl.load(keep_ptr + tap_src, mask=ok, other=0) != 0
            valid |= ok.to(tl.int32) << tap
    for g in range(0, G):
        acc = tl.zeros((BLOCK_T, BLOCK_C), tl.float32)
        x_cols = x_ptr + g * CG + cs[None, :]
        for j in range(0, K):
            src = ts + (j - PAD)
            if K <= 31:
                rmask = ((valid >> j) & 1) != 0
            else:
                rmask = (src >= 0) & (src < T)
                if MASK_IN:
                    rmask &= tl.load(keep_ptr + src, mask=rmask, other=0) != 0
            a = tl.load(x_cols + src[:, None] * D, mask=rmask[:, None] & cmask[None, :], other=0.0)
            w = tl.load(w_ptr + (g * K + j) * CG * CG + w_offs, mask=wmask, other=0.0)
            if DOT_FP32:
                acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision=INPUT_PRECISION)
            else:
                acc = tl.dot(a, w, acc)  # bf16/fp16 tensor cores, fp32 accumulation
        if HAS_BIAS:
            acc += tl.load(bias_ptr + g * CG + cs, mask=cmask, other=0.0).to(tl.float32)[None, :]
        offs = ts[:, None] * D + (g * CG + cs)[None, :]
        if NORM:
            # merge this group's (mean, M2) into the frame's (Chan et al.); padding columns are excluded
            g_mean = tl.sum(tl.where(cmask[None, :], acc, 0.0), axis=1) / CG
            dev = tl.where(cmask[None, :], acc - g_mean[:, None], 0.0)
            seen = g * CG * 1.0  # channels merged so far
            frac = CG / (seen + CG)
            delta = g_mean - mean
            mean += delta * frac
            m2 += tl.sum(dev * dev, axis=1) + delta * delta * seen * frac
            tl.store(u_ptr + offs, acc.to(u_ptr.dtype.element_ty), mask=omask)
        else:
            if MASK_OUT:
                acc = acc * keep_t[:, None]
            tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=omask)
    if NORM:
        tl.debug_barrier()  # pass 2 reads u written by other threads of this program
        rstd = tl.math.rsqrt(m2 / D + eps)  # biased variance, as LayerNorm's
        # in (BLOCK_T, BLOCK_D) chunks of the whole frame, not the groups' padded (BLOCK_T, BLOCK_C) tiles: no lanes
        # past Cg (a quarter of them at Cg = 48) run the GELU
        ds = tl.arange(0, BLOCK_D)
        for d0 in range(0, D, BLOCK_D):
            offs = ts[:, None] * D + (d0 + ds)[None, :]
            dmask = tmask[:, None] & (d0 + ds < D)[None, :]
            v = tl.load(u_ptr + offs, mask=dmask, other=0.0).to(tl.float32)
            z = (v - mean[:, None]) * rstd[:, None]
            y = _gelu(z)
            if MASK_OUT:
                y = y * keep_t[:, None]
            tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=dmask)
        tl.store(mean_ptr + b * T + ts, mean, mask=tmask)
        tl.store(rstd_ptr + b * T + ts, rstd, mask=tmask)


def _gelu_norm_grad(u_ptr, dy_ptr, offs, mask, mean, rstd, keep_t, HAS_KEEP: tl.constexpr):
    """(z, dzhat) of (BLOCK_T, n) channels of the frames: z = LayerNorm(u) (finite outside `mask`: u 0, mean and
    rstd 0 past T), dzhat = keep dy gelu'(z) (0 outside `mask`, as dy)."""
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = (u - mean[:, None]) * rstd[:, None]
    dzhat = dy * _gelu_grad(z)
    if HAS_KEEP:
        dzhat = dzhat * keep_t[:, None]
    return z, dzhat


def _pos_conv_ln_gelu_bwd_kernel(
    dy_ptr, u_ptr, mean_ptr, rstd_ptr, keep_ptr, dz_ptr, T, D,
    HAS_KEEP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
):  # fmt: skip
    """dz = keep * d/du of gelu(LayerNorm_D(u)) applied to dy, for BLOCK_T whole frames, as channels [0, BLOCK_D)
    and, when BLOCK_D2 > 0, [BLOCK_D, BLOCK_D + BLOCK_D2) (D = 768: 512 + 256, no padded lanes)."""
    pid_t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    ts = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = ts < T
    base = b * T * D  # int64; offsets within a batch row in int32 (T * D < 2**31: `fused_supported`)
    u_ptr += base
    dy_ptr += base
    dz_ptr += base
    mean = tl.load(mean_ptr + b * T + ts, mask=tmask, other=0.0)
    rstd = tl.load(rstd_ptr + b * T + ts, mask=tmask, other=0.0)
    keep_t = tl.load(keep_ptr + b * T + ts, mask=tmask, other=0).to(tl.float32) if HAS_KEEP else 0.0
    ds = tl.arange(0, BLOCK_D)
    mask = tmask[:, None] & (ds < D)[None, :]
    offs = ts[:, None] * D + ds[None, :]
    z, dzhat = _gelu_norm_grad(u_ptr, dy_ptr, offs, mask, mean, rstd, keep_t, HAS_KEEP)
    c1 = tl.sum(dzhat * z, axis=1)  # dzhat is 0 outside the mask: c1, c2 need none
    c2 = tl.sum(dzhat, axis=1)
    if BLOCK_D2 > 0:
        ds2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        mask2 = tmask[:, None] & (ds2 < D)[None, :]
        offs2 = ts[:, None] * D + ds2[None, :]
        z2, dzhat2 = _gelu_norm_grad(u_ptr, dy_ptr, offs2, mask2, mean, rstd, keep_t, HAS_KEEP)
        c1 += tl.sum(dzhat2 * z2, axis=1)
        c2 += tl.sum(dzhat2, axis=1)
        dz2 = (dzhat2 - (z2 * (c1 / D)[:, None] + (c2 / D)[:, None])) * rstd[:, None]
        tl.store(dz_ptr + offs2, dz2.to(dz_ptr.dtype.element_ty), mask=mask2)
    dz = (dzhat - (z * (c1 / D)[:, None] + (c2 / D)[:, None])) * rstd[:, None]
    tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)


def _pos_conv_dw_kernel(
    dz_ptr, x_ptr, keep_ptr, dw_ptr, T, D, G, CG, N_TBLK, N_BLK, ITERS,
    K: tl.constexpr, PAD: tl.constexpr, MASK_IN: tl.constexpr, DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Partial weight gradient of (tap j, group g) over one chunk of ITERS (batch row, T block) pairs:
    dw[chunk, g, j] = sum_t dz[t, g]^T (keep * x)[t + j - PAD, g], a (Cg_out, Cg_in) block. (The bias gradient,
    sum_t dz[t], is torch's sum over dz: here every tap's programs would reduce the same dz tiles.)"""
    j = tl.program_id(0)
    g = tl.program_id(1)
    chunk = tl.program_id(2)
    cs = tl.arange(0, BLOCK_C)
    cmask = cs < CG
    acc = tl.zeros((BLOCK_C, BLOCK_C), tl.float32)  # (c_out, c_in)
    # (batch row, T block) of the chunk's first block; then stepped, not divided (an integer division by a
    # runtime N_TBLK is ~25 instructions an iteration)
    b_i = (chunk * ITERS) // N_TBLK
    t_blk = (chunk * ITERS) % N_TBLK
    for it in range(0, ITERS):
        blk = chunk * ITERS + it  # blocks past the last are fully masked
        b = b_i.to(tl.int64)
        ts = t_blk * BLOCK_T + tl.arange(0, BLOCK_T)
        tmask = ts < tl.where(blk < N_BLK, T, 0)
        src = ts + (j - PAD)
        rmask = tmask & (src >= 0) & (src < T)
        if MASK_IN:
            rmask &= tl.load((keep_ptr + b * T) + src, mask=rmask, other=0) != 0
        row = b * T * D + g * CG  # int64 into the pointers; int32 offsets within the batch row (T * D < 2**31)
        dzt = tl.load(
            (dz_ptr + row) + (ts[None, :] * D + cs[:, None]), mask=cmask[:, None] & tmask[None, :], other=0.0
        )
        xa = tl.load((x_ptr + row) + (src[:, None] * D + cs[None, :]), mask=rmask[:, None] & cmask[None, :], other=0.0)
        if DOT_FP32:
            dzt = dzt.to(tl.float32)
            acc = tl.dot(dzt, xa.to(tl.float32), acc, input_precision=INPUT_PRECISION)
        else:
            acc = tl.dot(dzt, xa, acc)
        t_blk += 1
        b_i = tl.where(t_blk == N_TBLK, b_i + 1, b_i)
        t_blk = tl.where(t_blk == N_TBLK, 0, t_blk)
    block = ((chunk * G + g) * K + j).to(tl.int64) * CG * CG
    tl.store(dw_ptr + block + cs[:, None] * CG + cs[None, :], acc, mask=cmask[:, None] & cmask[None, :])


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _dot_config(x: Tensor) -> dict:
    fp32 = dot_in_fp32(x.dtype)
    tf32 = x.is_cuda and x.dtype == torch.float32 and conv_uses_tf32()
    return {"DOT_FP32": fp32, "INPUT_PRECISION": "tf32" if tf32 else "ieee"}


def _block_c(cg: int) -> int:
    return max(16, next_pow2(cg))  # tl.dot takes tiles of at least 16


def _conv_launch(
    x: Tensor, keep: Tensor | None, wk: Tensor, bias: Tensor | None, pad: int, eps: float, norm: bool, mask_in: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out, u, mean, rstd) of `_pos_conv_kernel` over dense (B, T, D) x with wk (G, K, Cg, Cg); u, mean,
    rstd are empty unless `norm`."""
    B, T, D = x.shape
    G, K, CG, _ = wk.shape
    out_dtype = kernel_out_dtype(x.dtype)
    out = torch.empty((B, T, D), dtype=out_dtype, device=x.device)
    u = torch.empty((B, T, D) if norm else (0,), dtype=out_dtype, device=x.device)
    mean = torch.empty((B, T) if norm else (0,), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if B and T:
        block_t = max(16, min(BLOCK_T_CONV, next_pow2(T)))
        _pos_conv_kernel[(cdiv(T, block_t), B)](
            x, keep, wk, bias, out, u, mean, rstd, T, D, G, CG, eps,
            K=K, PAD=pad, NORM=norm, MASK_IN=mask_in and keep is not None, MASK_OUT=keep is not None,
            HAS_BIAS=bias is not None, BLOCK_T=block_t, BLOCK_C=_block_c(CG), BLOCK_D=BLOCK_D_NORM,
            num_warps=NUM_WARPS_CONV,
            **_dot_config(x),
        )  # fmt: skip
    return out.to(x.dtype), u.to(x.dtype), mean, rstd


def _as_uint8(keep: Tensor | None) -> Tensor | None:
    return None if keep is None else keep.contiguous().view(torch.uint8)  # bool -> uint8: the same bytes


def _fwd_launch(
    x: Tensor, keep: Tensor | None, weight: Tensor, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    jit_in_place(globals(), KERNELS)
    D, CG, K = weight.shape
    wk = weight.view(D // CG, CG, CG, K).permute(0, 3, 2, 1).to(x.dtype).contiguous()  # (G, K, Cg_in, Cg_out)
    return _conv_launch(x.contiguous(), _as_uint8(keep), wk, bias, K // 2, eps, norm=True, mask_in=True)


def _prev_pow2(n: int) -> int:
    return next_pow2(n) if next_pow2(n) == n else next_pow2(n) // 2


def ln_bwd_config(D: int, T: int) -> dict[str, int]:
    """The LayerNorm-GELU backward's launch: BLOCK_T frames; channels in two parts, the largest power of two <= D
    then the rest padded to one (768 = 512 + 256: no padded lanes); num_warps."""
    head = _prev_pow2(D)
    tail = next_pow2(D - head) if head < D else 0
    block_t = max(1, min(64, BWD_TILE // next_pow2(D), next_pow2(T)))
    num_warps = max(1, min(16, _prev_pow2(max(1, block_t * (head + tail) // (32 * BWD_PER_THREAD)))))
    return {"BLOCK_T": block_t, "BLOCK_D": head, "BLOCK_D2": tail, "num_warps": num_warps}


def _bwd_launch(
    grad_y: Tensor, x: Tensor, keep: Tensor | None, weight: Tensor, u: Tensor, mean: Tensor, rstd: Tensor,
    has_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    jit_in_place(globals(), KERNELS)
    B, T, D = x.shape
    _, CG, K = weight.shape
    G = D // CG
    x, grad_y, keep = x.contiguous(), grad_y.contiguous(), _as_uint8(keep)
    dz = torch.empty((B, T, D), dtype=kernel_out_dtype(x.dtype), device=x.device)
    block_c = _block_c(CG)
    n_tblk = cdiv(T, BLOCK_T_DW)
    n_blk = B * n_tblk
    chunks = min(n_blk, max(1, DW_PROGRAMS // (K * G)))
    iters = cdiv(n_blk, chunks) if chunks else 0
    dw_part = torch.zeros((chunks, G, K, CG, CG), dtype=torch.float32, device=x.device)
    if B and T:
        config = ln_bwd_config(D, T)
        _pos_conv_ln_gelu_bwd_kernel[(cdiv(T, config["BLOCK_T"]), B)](
            grad_y, u, mean, rstd, keep, dz, T, D, HAS_KEEP=keep is not None, **config,
        )  # fmt: skip
        dz = dz.to(x.dtype)  # the dots' operand dtype (a no-op on a GPU)
        _pos_conv_dw_kernel[(K, G, chunks)](
            dz, x, keep, dw_part, T, D, G, CG, n_tblk, n_blk, iters,
            K=K, PAD=K // 2, MASK_IN=keep is not None, BLOCK_T=BLOCK_T_DW, BLOCK_C=block_c, num_warps=4,
            **_dot_config(x),
        )  # fmt: skip
    # grad_x: the forward's conv of dz with W^T, taps flipped, offset k - 1 - k // 2; times keep
    wt = weight.view(G, CG, CG, K).flip(3).permute(0, 3, 1, 2).to(x.dtype).contiguous()  # (G, K, Cg_o, Cg_i)
    grad_x = _conv_launch(dz.to(x.dtype), keep, wt, None, K - 1 - K // 2, 0.0, norm=False, mask_in=False)[0]
    # fixed-order sums of the partials (deterministic); (G, K, Cg_out, Cg_in) -> (D, Cg, K)
    grad_w = dw_part.sum(0).permute(0, 2, 3, 1).reshape(D, CG, K).to(weight.dtype)
    grad_b = dz.sum((0, 1), dtype=torch.float32).to(weight.dtype) if has_bias else x.new_empty(0)  # deterministic
    return grad_x, grad_w, grad_b


# --------------------------------------------------------------------------------------------
# Custom ops + autograd
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("spidr_fast::pos_conv", mutates_args=())
def _pos_conv_op(
    x: Tensor, keep: Tensor | None, weight: Tensor, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, u, mean, rstd); groups = D / weight.shape[1]; u, mean and rstd are kept for the backward."""
    return _fwd_launch(x, keep, weight, bias, eps)


@_pos_conv_op.register_fake
def _(
    x: Tensor, keep: Tensor | None, weight: Tensor, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    B, T, D = x.shape
    stats = x.new_empty((B, T), dtype=torch.float32)
    return x.new_empty((B, T, D)), x.new_empty((B, T, D)), stats, torch.empty_like(stats)


@torch.library.custom_op("spidr_fast::pos_conv_backward", mutates_args=())
def _pos_conv_backward_op(
    grad_y: Tensor, x: Tensor, keep: Tensor | None, weight: Tensor, u: Tensor, mean: Tensor, rstd: Tensor,
    has_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """(grad_x, grad_weight, grad_bias); grad_bias is an empty (0,) tensor when there is no bias."""
    return _bwd_launch(grad_y, x, keep, weight, u, mean, rstd, has_bias)


@_pos_conv_backward_op.register_fake
def _(
    grad_y: Tensor, x: Tensor, keep: Tensor | None, weight: Tensor, u: Tensor, mean: Tensor, rstd: Tensor,
    has_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    grad_b = weight.new_empty(weight.shape[0]) if has_bias else x.new_empty(0)
    return x.new_empty(x.shape), torch.empty_like(weight, memory_format=torch.contiguous_format), grad_b


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    x, keep, weight, bias, _ = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, keep, weight, output[1], output[2], output[3])


def _backward(ctx, grad_y: Tensor, *_: Tensor | None) -> tuple:
    # u, mean and rstd are internals (the public function returns only y): no gradient flows from them
    x, keep, weight, u, mean, rstd = ctx.saved_tensors
    grad_x, grad_w, grad_b = _pos_conv_backward_op(grad_y, x, keep, weight, u, mean, rstd, ctx.has_bias)
    return grad_x, None, grad_w, grad_b if ctx.has_bias else None, None


_pos_conv_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public function (dispatch: Triton where it runs, else the reference)
# --------------------------------------------------------------------------------------------


def _check(x: Tensor, keep: Tensor | None, weight: Tensor, bias: Tensor | None, groups: int) -> None:
    if x.dim() != 3:
        raise ValueError(f"pos_conv_layer: x must have shape (B, T, D), got {tuple(x.shape)}")
    B, T, D = x.shape
    if groups < 1 or D % groups or tuple(weight.shape[:2]) != (D, D // groups) or weight.dim() != 3:
        raise ValueError(
            f"pos_conv_layer: weight must have shape (D, D / groups, k) = ({D}, {D}/{groups}, k),"
            f" got {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (D,):
        raise ValueError(f"pos_conv_layer: bias must have shape ({D},), got {tuple(bias.shape)}")
    if keep is not None and (keep.dtype != torch.bool or tuple(keep.shape) != (B, T)):
        raise ValueError(f"pos_conv_layer: keep must be a ({B}, {T}) bool mask, got {keep.dtype} {tuple(keep.shape)}")


def fused_supported(x: Tensor, weight: Tensor) -> bool:
    """Shapes the kernels take: Cg <= MAX_CG, D <= MAX_D, int32 offsets within a batch row."""
    _, T, D = x.shape
    return weight.shape[1] <= MAX_CG and D <= MAX_D and T * D < 2**31


def pos_conv_layer(
    x: Tensor, keep: Tensor | None, weight: Tensor, bias: Tensor | None, groups: int, eps: float = 1e-5
) -> Tensor:
    """keep * gelu(LayerNorm(conv(keep * x))): one positional-conv layer, channels-last, in one fused op.

    Args:
        x: (B, T, D) fp32/bf16/fp16, the layer's input.
        keep: (B, T) bool, True on real frames (padded frames are zero in and out), or None (no padding).
        weight: (D, D / groups, k) the nn.Conv1d weight; bias: (D,) or None. Any float dtype: under autocast
            the fused path casts x, weight and bias to the autocast dtype (as autocast casts a conv's).
        groups: the conv's groups.
        eps: the LayerNorm's (no affine) eps.

    Returns:
        (B, T, D), contiguous on the fused path. Differentiable in x, weight, bias.
    """
    _check(x, keep, weight, bias, groups)
    device = x.device.type
    if _dispatch.use_fused(x.device, "pos_conv") and fused_supported(x, weight):
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        bias = None if bias is None else bias.to(dtype)
        return _pos_conv_op(x.to(dtype), keep, weight.to(dtype), bias, eps)[0]
    return pos_conv_layer_ref(x, keep, weight, bias, groups, eps)


def pos_conv_layer_ref(
    x: Tensor, keep: Tensor | None, weight: Tensor, bias: Tensor | None, groups: int, eps: float = 1e-5
) -> Tensor:
    """Reference: what one layer of the model's ConvPositionalEmbedding computes (the mask applied to the input
    and to the output: the same values as masking once between layers), on a (B, D, T) view of x."""
    k = weight.shape[-1]
    mask = None if keep is None else keep.unsqueeze(1).to(x.dtype)  # (B, 1, T)
    h = x.transpose(1, 2)  # (B, T, D) -> (B, D, T), a view (channels-last for cuDNN)
    if mask is not None:
        h = h * mask
    h = F.conv1d(h, weight, bias, padding=k // 2, groups=groups)
    if k % 2 == 0:
        h = h[..., :-1]  # an even kernel gives one frame too many
    h = channel_layer_norm_gelu(h, None, None, eps)
    if mask is not None:
        h = h * mask
    return h.transpose(1, 2)  # (B, D, T) -> (B, T, D)
