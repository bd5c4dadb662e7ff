"""Teacher targets: instance-normalise each layer over time, then keep only the masked frames.

Inputs and outputs (C target layers, B utterances, T frames, D dims, M masked frames per row):
    layers        C tensors (B, T, D), any float dtype (the teacher's FFN outputs)
    key_mask      (B, T) bool, True on real frames, or None when nothing is padded
    mask_indices  (B, M) int64
    targets       (C, B * M, D) fp32: (x - mean_t) / sqrt(var_t + eps) at the masked frames

The reference normalises every frame and then gathers (it writes C x B x T x D fp32 twice); the
fast path takes the per-(utterance, channel) statistics in one reduction, gathers the raw masked
frames, and normalises only those, writing the (C, B * M, D) result once. The two differ by float
rounding of the statistics (~1e-7 relative), so the CPU default stays the reference, which is
bitwise the reference implementation's `F.instance_norm`. The op "targets" of `_dispatch.use_fused`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from spidr_fast.kernels import _dispatch

EPS = 1e-5


def select_masked(x: Tensor, mask_indices: Tensor) -> Tensor:
    """(B, T, D) at (B, M) frame indices -> (B * M, D)."""
    return x.gather(1, mask_indices.unsqueeze(-1).expand(-1, -1, x.shape[-1])).flatten(0, 1)


def instance_norm(x: Tensor, key_mask: Tensor | None = None) -> Tensor:
    """Normalise each channel over time, in fp32: (B, T, D) -> (B, T, D).

    Without padding this is exactly `F.instance_norm` (the reference); with padding, statistics
    cover real frames only (the reference would include the padded frames).
    """
    x = x.float()
    if key_mask is None:
        return F.instance_norm(x.transpose(1, 2), eps=EPS).transpose(1, 2)
    m = key_mask.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
    n = m.sum(1, keepdim=True).clamp_min(1)
    mean = (x * m).sum(1, keepdim=True) / n
    var = ((x - mean).square() * m).sum(1, keepdim=True) / n
    return (x - mean) * torch.rsqrt(var + EPS)


def instance_norm_targets_ref(layers: list[Tensor], key_mask: Tensor | None, mask_indices: Tensor) -> Tensor:
    """Normalise every frame of every layer, then gather (the reference's order of work)."""
    return torch.stack([select_masked(instance_norm(x, key_mask), mask_indices) for x in layers])


def instance_norm_targets_fast(layers: list[Tensor], key_mask: Tensor | None, mask_indices: Tensor) -> Tensor:
    """Per layer: statistics in one reduction, then normalise only the gathered frames into the output."""
    batch, masked = mask_indices.shape
    out = torch.empty(len(layers), batch * masked, layers[0].shape[-1], device=mask_indices.device)
    m = None if key_mask is None else key_mask.unsqueeze(-1)  # (B, T, 1)
    for c, x in enumerate(layers):
        x = x.float()  # a no-op for the fp32 teacher
        if m is None:
            var, mean = torch.var_mean(x, dim=1, correction=0, keepdim=True)  # (B, 1, D)
        else:
            n = m.sum(1, keepdim=True).clamp_min(1)
            mean = x.masked_fill(~m, 0).sum(1, keepdim=True) / n
            var = (x - mean).masked_fill(~m, 0).square().sum(1, keepdim=True) / n
        picked = x.gather(1, mask_indices.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, M, D)
        torch.mul(picked - mean, torch.rsqrt(var + EPS), out=out[c].view(batch, masked, x.shape[-1]))
    return out


def instance_norm_targets(layers: list[Tensor], key_mask: Tensor | None, mask_indices: Tensor) -> Tensor:
    """(C, B * M, D) fp32 teacher targets: the fast path where `_dispatch.use_fused` says so, else the reference."""
    if _dispatch.use_fused(layers[0].device, "targets"):
        return instance_norm_targets_fast(layers, key_mask, mask_indices)
    return instance_norm_targets_ref(layers, key_mask, mask_indices)
