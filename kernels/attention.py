"""Self-attention backends for the transformer blocks.

q, k, v: (B, H, T, Dh) -> (B, H, T, Dh). A padded batch is described once per forward by a
`Padding`, built OUTSIDE the compiled layers (`Padding.from_mask`, once per batch): the key mask,
and for the packed backends the flat indices of the real frames and int32 cumulative lengths (a
`nonzero`, i.e. a host sync, that must not run inside a compiled region). None means nothing is
padded: then no mask reaches SDPA, which lets it pick its flash backend (any mask, even all-True,
rules that out).

Backends for padded batches, chosen per call (`select_backend`) from those the `Padding` was built
for, by dtype and dropout:
- "flash_attn_4": FlashAttention-4 (`flash_attn.cute`, the `flash-attn-4` wheel; CuTe DSL, Hopper
  and newer) on the packed real frames. It has no dropout and spidr_fast calls only its forward
  (an opaque custom op): chosen for fp16/bf16 calls without dropout or gradient (the teacher,
  extraction).
- "flash_attn": flash-attn 2's `flash_attn_varlen_func` on the packed real frames (fp16/bf16,
  dropout, backward).
- "nested": SDPA on nested jagged tensors built from the packed frames (CUDA without flash-attn;
  SDPA's flash backend runs them).
- "masked": SDPA with a broadcast (B, 1, 1, T) key mask, never a (T, T) one: the CPU default, the
  fallback of every other backend (fp32 inputs for the flash ones; a `Padding` built inside a
  compiled region, which has no packed metadata), and the reference the others are tested against.
The packed backends take `max_seqlen` = T, the padded length (a bound, which is all they need; the
exact value would be a host sync, and a Python int that a compiled layer would specialise on).
Padded query rows come out as zeros from the packed backends and as attention over real keys from
"masked"; real rows agree to dtype tolerance. `SPIDR_FAST_ATTENTION` forces a backend (it still
falls back to "masked" where the forced one cannot run). The op "attention" of `_dispatch.use_fused`:
its fused path is the packed backends, its reference `self_attention_ref` ("masked"), so
`SPIDR_FAST_BACKEND=reference` (or "attention" in `SPIDR_FAST_REFERENCE_OPS`) runs "masked" only.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from spidr_fast.kernels import _dispatch

BACKENDS = ("flash_attn_4", "flash_attn", "nested", "masked")
PACKED = BACKENDS[:-1]
FLASH_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def _flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


@functools.cache
def _flash_attn_4_varlen():
    try:
        from flash_attn.cute import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def _compute_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def packed_backends(device: torch.device) -> tuple[str, ...]:
    """The packed backends usable on `device`, in order of preference; none where `_dispatch.use_fused`
    keeps "attention" on its reference. `SPIDR_FAST_ATTENTION` forces one (on any device)."""
    forced = os.environ.get("SPIDR_FAST_ATTENTION") or None
    if forced is not None and forced not in BACKENDS:
        raise ValueError(f"SPIDR_FAST_ATTENTION must be one of {BACKENDS}, got {forced!r}")
    if forced == "masked" or not _dispatch.use_fused(device, "attention", requested=forced is not None):
        return ()
    if forced is not None:
        return (forced,)
    if device.type != "cuda":
        return ()
    found = []
    if _flash_attn_4_varlen() is not None and _compute_capability(device) >= (9, 0):
        found.append("flash_attn_4")
    if _flash_attn_varlen() is not None:
        found.append("flash_attn")
    return (*found, "nested")


@dataclasses.dataclass(frozen=True, eq=False)
class Padding:
    """A padded batch's real frames, computed once per batch and passed to every layer."""

    mask: Tensor  # (B, T) bool, True on real frames (a prefix of each row)
    backends: tuple[str, ...] = ()  # packed backends the metadata below was built for
    cu_seqlens: Tensor | None = None  # (B + 1,) int32 cumulative real lengths
    indices: Tensor | None = None  # (N,) int64 flat positions b * T + t of the real frames

    @classmethod
    def from_mask(cls, mask: Tensor) -> Padding:
        """Call outside compiled layers: the packed metadata costs a host sync (`nonzero`). Inside a
        compiled region (whole-model compile) it is skipped and attention runs masked SDPA."""
        backends = () if torch.compiler.is_compiling() else packed_backends(mask.device)
        if not backends:
            return cls(mask)
        cu_seqlens = F.pad(mask.sum(-1).cumsum(0), (1, 0)).to(torch.int32)
        return cls(mask, backends, cu_seqlens, mask.flatten().nonzero().squeeze(1))

    def pack(self, x: Tensor) -> Tensor:
        """(B, H, T, Dh) -> (N, H, Dh), the real frames only."""
        return x.transpose(1, 2).flatten(0, 1).index_select(0, self.indices)

    def unpack(self, packed: Tensor, batch: int, seq: int) -> Tensor:
        """(N, H, Dh) -> (B, H, T, Dh), zeros on padded frames."""
        out = packed.new_zeros(batch * seq, *packed.shape[1:]).index_copy_(0, self.indices, packed)
        return out.view(batch, seq, *packed.shape[1:]).transpose(1, 2)


def select_backend(padding: Padding, q: Tensor, dropout_p: float) -> str:
    """The first of the padding's packed backends that runs this call, else "masked"."""
    half = q.dtype in FLASH_DTYPES
    for name in padding.backends:
        if name == "flash_attn_4" and half and dropout_p == 0.0 and not (torch.is_grad_enabled() and q.requires_grad):
            return name
        if name == "flash_attn" and half:
            return name
        if name == "nested":
            return name
    return "masked"


def self_attention_ref(
    q: Tensor, k: Tensor, v: Tensor, padding: Padding | None = None, dropout_p: float = 0.0
) -> Tensor:
    """SDPA with a broadcast (B, 1, 1, T) key mask (no mask at all when nothing is padded)."""
    mask = None if padding is None else padding.mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def _missing(backend: str, package: str) -> RuntimeError:
    return RuntimeError(f"attention backend {backend!r} needs the {package} package (pip install {package})")


def _attention_flash_attn(q: Tensor, k: Tensor, v: Tensor, padding: Padding, dropout_p: float) -> Tensor:
    flash_attn_varlen_func = _flash_attn_varlen()
    if flash_attn_varlen_func is None:
        raise _missing("flash_attn", "flash-attn")
    batch, _, seq, _ = q.shape
    q, k, v, cu = padding.pack(q), padding.pack(k), padding.pack(v), padding.cu_seqlens
    out = flash_attn_varlen_func(q, k, v, cu, cu, seq, seq, dropout_p=dropout_p)
    return padding.unpack(out, batch, seq)


@torch.library.custom_op("spidr_fast::flash_attn_4_varlen", mutates_args=())
def _flash_attn_4_op(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
    """FA4's forward on packed (N, H, Dh) frames, opaque to torch.compile (its CuTe DSL cannot be traced)."""
    flash_attn_varlen_func = _flash_attn_4_varlen()
    if flash_attn_varlen_func is None:
        raise _missing("flash_attn_4", "flash-attn-4")
    out = flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)
    return (out[0] if isinstance(out, tuple) else out).contiguous()  # (out, lse) in recent versions


@_flash_attn_4_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
    return torch.empty_like(q)


def _attention_flash_attn_4(q: Tensor, k: Tensor, v: Tensor, padding: Padding) -> Tensor:
    batch, _, seq, _ = q.shape
    out = _flash_attn_4_op(padding.pack(q), padding.pack(k), padding.pack(v), padding.cu_seqlens, seq)
    return padding.unpack(out, batch, seq)


def _attention_nested(q: Tensor, k: Tensor, v: Tensor, padding: Padding, dropout_p: float) -> Tensor:
    batch, _, seq, _ = q.shape
    offsets = padding.cu_seqlens.long()

    def nested(x: Tensor) -> Tensor:  # (N, H, Dh) -> nested (B, H, T_b, Dh)
        return torch.nested.nested_tensor_from_jagged(padding.pack(x), offsets, max_seqlen=seq).transpose(1, 2)

    out = F.scaled_dot_product_attention(nested(q), nested(k), nested(v), dropout_p=dropout_p)
    return padding.unpack(out.transpose(1, 2).values(), batch, seq)


def self_attention(q: Tensor, k: Tensor, v: Tensor, padding: Padding | None = None, dropout_p: float = 0.0) -> Tensor:
    """Multi-head attention over the real frames of each utterance, with dropout.

    Args:
        q, k, v: (B, H, T, Dh), any float dtype.
        padding: the batch's `Padding`, or None when no frame is padded.
        dropout_p: attention dropout probability (0 in eval).
    Returns:
        (B, H, T, Dh); padded query rows are zeros (packed backends) or attend to real keys (masked).
    """
    if padding is None:  # nothing padded: plain SDPA, which is also the reference
        return self_attention_ref(q, k, v, None, dropout_p)
    backend = select_backend(padding, q, dropout_p)
    if backend == "flash_attn_4":
        return _attention_flash_attn_4(q, k, v, padding)
    if backend == "flash_attn":
        return _attention_flash_attn(q, k, v, padding, dropout_p)
    if backend == "nested":
        return _attention_nested(q, k, v, padding, dropout_p)
    return self_attention_ref(q, k, v, padding, dropout_p)
