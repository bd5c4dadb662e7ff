"""Padded batches: the reference's boolean attention mask and the cheaper per-utterance lengths.

The reference takes a boolean attention mask (batch, 1, frames, frames), True where a key is a real
frame. spidr_fast also takes `lengths` (batch,) in samples, which costs nothing to build and is the
only form that gives exact group-norm statistics (a frame mask cannot tell how many samples of the
last frame were real). Inside the model a padded batch is a (batch, frames) key mask, or None when
nothing is padded (so attention runs with no mask at all).
"""

from __future__ import annotations

import torch
from torch import Tensor

from spidr_fast.kernels.targets import instance_norm as masked_instance_norm  # noqa: F401  (re-exported)


def key_mask_from_attention_mask(attention_mask: Tensor, num_frames: int) -> Tensor:
    """(B, 1, T, T) or (B, 1, 1, T) bool attention mask -> (B, T) key mask.

    The reference takes both: its collator builds the broadcast (B, 1, 1, T) form. Row 0 of the
    (T, T) form: the rows of a padding mask are equal.
    """
    shape = tuple(attention_mask.shape)
    if attention_mask.dim() != 4 or shape[1] != 1 or shape[2] not in (1, num_frames) or shape[3] != num_frames:
        raise ValueError(
            f"attention_mask must have shape (batch, 1, {num_frames}, {num_frames}) or (batch, 1, 1, {num_frames}),"
            f" got {shape}"
        )
    if attention_mask.dtype != torch.bool:
        raise ValueError(f"attention_mask must be bool (True where attention is allowed), got {attention_mask.dtype}")
    return attention_mask[:, 0, 0, :]


def key_mask_from_lengths(frame_lengths: Tensor, num_frames: int) -> Tensor:
    """(B,) frame counts -> (B, T) bool mask, True on real frames."""
    return torch.arange(num_frames, device=frame_lengths.device) < frame_lengths.unsqueeze(-1)


def attention_mask_from_lengths(frame_lengths: Tensor, num_frames: int) -> Tensor:
    """The reference's (B, 1, T, T) mask from frame counts, for callers that need its form."""
    key_mask = key_mask_from_lengths(frame_lengths, num_frames)
    return key_mask[:, None, None, :].expand(-1, 1, num_frames, -1)
