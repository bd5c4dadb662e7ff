"""Self-attention backends for the transformer blocks.

q, k, v: (B, H, T, Dh) -> (B, H, T, Dh). A padded batch is described once per forward by a
`Padding` (key mask, flat indices of the real frames, int32 cumulative lengths), or None when
nothing is padded: then no mask reaches SDPA, which lets it pick its flash backend (any mask, even
all-True, rules that out).

Backends for padded batches (attention dropout is part of the recipe, so all of them support it):
- "flash_attn": flash-attn 2's `flash_attn_varlen_func` on the packed real frames (CUDA, when
  installed): a thin call, no (T, T) anything.
- "nested": SDPA on nested jagged tensors built from the packed frames (CUDA without flash-attn;
  SDPA's flash backend runs them).
- "masked": SDPA with a broadcast (B, 1, 1, T) key mask, never a (T, T) one (the CPU default; also
  the reference the others are tested against).
Padded query rows come out as zeros from the packed backends and as attention over real keys from
"masked"; real rows agree to dtype tolerance. `SPIDR_FAST_ATTENTION` forces a backend.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("flash_attn", "nested", "masked")


class Padding:
    """A padded batch's real frames. The packed-backend bookkeeping (flat indices, cumulative lengths,
    longest length) is computed on first use, once per forward: it syncs with the host, which the
    masked backend (and a compiled graph using it) never needs to."""

    def __init__(self, mask: Tensor):
        self.mask = mask  # (B, T) bool, True on real frames (a prefix of each row)

    @classmethod
    def from_mask(cls, mask: Tensor) -> Padding:
        return cls(mask)

    @functools.cached_property
    def cu_seqlens(self) -> Tensor:
        """(B + 1,) int32 cumulative real lengths."""
        return F.pad(self.mask.sum(-1).cumsum(0), (1, 0)).to(torch.int32)

    @functools.cached_property
    def indices(self) -> Tensor:
        """(N,) int64 flat positions b * T + t of the real frames."""
        return self.mask.flatten().nonzero().squeeze(1)

    @functools.cached_property
    def max_seqlen(self) -> int:
        return int(self.mask.sum(-1).max()) if self.mask.shape[0] else 0

    def pack(self, x: Tensor) -> Tensor:
        """(B, H, T, Dh) -> (N, H, Dh), the real frames only."""
        return x.transpose(1, 2).flatten(0, 1).index_select(0, self.indices)

    def unpack(self, packed: Tensor, batch: int, seq: int) -> Tensor:
        """(N, H, Dh) -> (B, H, T, Dh), zeros on padded frames."""
        out = packed.new_zeros(batch * seq, *packed.shape[1:]).index_copy_(0, self.indices, packed)
        return out.view(batch, seq, *packed.shape[1:]).transpose(1, 2)


@functools.cache
def _flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def default_backend(x: Tensor) -> str:
    """flash-attn on CUDA when installed, else nested SDPA on CUDA; masked SDPA on CPU."""
    forced = os.environ.get("SPIDR_FAST_ATTENTION")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"SPIDR_FAST_ATTENTION must be one of {BACKENDS}, got {forced!r}")
        return forced
    if not x.is_cuda:
        return "masked"
    return "flash_attn" if _flash_attn_varlen() is not None else "nested"


def attention_ref(q: Tensor, k: Tensor, v: Tensor, padding: Padding | None = None, dropout_p: float = 0.0) -> Tensor:
    """SDPA with a broadcast (B, 1, 1, T) key mask (no mask at all when nothing is padded)."""
    mask = None if padding is None else padding.mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def _attention_flash_attn(q: Tensor, k: Tensor, v: Tensor, padding: Padding, dropout_p: float) -> Tensor:
    flash_attn_varlen_func = _flash_attn_varlen()
    if flash_attn_varlen_func is None:
        raise RuntimeError("attention backend 'flash_attn' needs the flash-attn package (pip install flash-attn)")
    batch, _, seq, _ = q.shape
    cu, n = padding.cu_seqlens, padding.max_seqlen
    out = flash_attn_varlen_func(padding.pack(q), padding.pack(k), padding.pack(v), cu, cu, n, n, dropout_p=dropout_p)
    return padding.unpack(out, batch, seq)


def _attention_nested(q: Tensor, k: Tensor, v: Tensor, padding: Padding, dropout_p: float) -> Tensor:
    batch, _, seq, _ = q.shape
    offsets = padding.cu_seqlens.long()

    def nested(x: Tensor) -> Tensor:  # (N, H, Dh) -> nested (B, H, T_b, Dh)
        njt = torch.nested.nested_tensor_from_jagged(padding.pack(x), offsets, max_seqlen=padding.max_seqlen)
        return njt.transpose(1, 2)

    out = F.scaled_dot_product_attention(nested(q), nested(k), nested(v), dropout_p=dropout_p)
    return padding.unpack(out.transpose(1, 2).values(), batch, seq)


def attention(q: Tensor, k: Tensor, v: Tensor, padding: Padding | None = None, dropout_p: float = 0.0) -> Tensor:
    """Multi-head attention over the real frames of each utterance, with dropout.

    Args:
        q, k, v: (B, H, T, Dh), any float dtype.
        padding: the batch's `Padding`, or None when no frame is padded.
        dropout_p: attention dropout probability (0 in eval).
    Returns:
        (B, H, T, Dh); padded query rows are zeros (packed backends) or attend to real keys (masked).
    """
    if padding is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    backend = default_backend(q)
    if backend == "flash_attn":
        return _attention_flash_attn(q, k, v, padding, dropout_p)
    if backend == "nested":
        return _attention_nested(q, k, v, padding, dropout_p)
    return attention_ref(q, k, v, padding, dropout_p)
