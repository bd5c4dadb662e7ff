"""Self-attention backends for the transformer blocks.

q, k, v: (B, H, T, Dh). Padding is given per utterance as `key_mask` (B, T) bool, True for real
frames, or None when nothing in the batch is padded: then no mask reaches SDPA, which lets it
pick its flash backend (any mask, even all-True, rules that out).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def attention_ref(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None, dropout_p: float = 0.0) -> Tensor:
    """SDPA with a broadcast (B, 1, 1, T) key mask: never a (T, T) mask."""
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
