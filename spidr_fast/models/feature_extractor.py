"""Waveform -> frame features: 7 strided conv blocks, then LayerNorm + Linear to the encoder width."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spidr_fast.kernels import _dispatch
from spidr_fast.kernels.conv0 import conv0_layer_norm_gelu
from spidr_fast.kernels.conv_frontend import channel_layer_norm_gelu


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, T) tensor."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.transpose(-2, -1)).transpose(-2, -1)


def masked_group_norm(x: Tensor, norm: nn.GroupNorm, valid: Tensor) -> Tensor:
    """GroupNorm with one group per channel, statistics over the first `valid` (B,) time steps only."""
    m = (torch.arange(x.shape[-1], device=x.device) < valid.unsqueeze(-1)).unsqueeze(1).to(x.dtype)  # (B, 1, T)
    n = m.sum(-1, keepdim=True).clamp_min(1)
    mean = (x * m).sum(-1, keepdim=True) / n
    var = ((x - mean).square() * m).sum(-1, keepdim=True) / n
    y = (x - mean) * torch.rsqrt(var + norm.eps)
    return y * norm.weight.unsqueeze(-1) + norm.bias.unsqueeze(-1)


class ConvBlock(nn.Module):
    """conv -> norm (channel LayerNorm, GroupNorm or none) -> GELU, on (B, C, T)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int, norm: str | None, *, bias: bool
    ):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride, bias=bias)
        nn.init.kaiming_normal_(self.conv.weight)
        # The norm is stored as `layer_norm` whatever its kind: that is the reference's state-dict key.
        self.layer_norm: nn.Module | None = None
        if norm == "layer_norm":
            self.layer_norm = ChannelLayerNorm(out_channels)
        elif norm == "group_norm":
            self.layer_norm = nn.GroupNorm(out_channels, out_channels)

    def output_lengths(self, lengths: Tensor) -> Tensor:
        return torch.div(lengths - self.kernel_size, self.stride, rounding_mode="floor").add(1).clamp_min(0)

    def forward(self, x: Tensor, lengths: Tensor | None = None, *, channels_last: bool | None = None) -> Tensor:
        """`channels_last`: the layout the fused channel LayerNorm + GELU writes (None: the conv output's)."""
        if isinstance(self.layer_norm, ChannelLayerNorm):  # fused: no transposes, one read and one write
            ln = self.layer_norm
            # The first block reads the waveform: conv + LayerNorm + GELU in one op (kernels/conv0.py). A GroupNorm
            # first block (group_norm mode) normalises over time, so it cannot fuse so and takes the path below.
            if self.conv.in_channels == 1:
                w, b = self.conv.weight, self.conv.bias
                return conv0_layer_norm_gelu(
                    x.squeeze(1), w, b, ln.weight, ln.bias, self.stride, ln.eps, channels_last=channels_last
                )
            return channel_layer_norm_gelu(self.conv(x), ln.weight, ln.bias, ln.eps, channels_last=channels_last)
        x = self.conv(x)
        if isinstance(self.layer_norm, nn.GroupNorm) and lengths is not None:
            x = masked_group_norm(x, self.layer_norm, self.output_lengths(lengths))
        elif self.layer_norm is not None:
            x = self.layer_norm(x)
        return F.gelu(x)


class ConvFeatureExtractor(nn.Module):
    """(B, samples) waveforms -> (B, frames, channels). 320 samples per frame with the default layers.

    The model's conv stack, stored as `feature_extractor` (the reference's state-dict name); not to be
    confused with `spidr_fast.FeatureExtractor`, the extraction API.
    """

    def __init__(self, conv_layer_config: list[tuple[int, int, int]], mode: str, *, bias: bool):
        super().__init__()
        blocks, in_channels = [], 1
        for i, (out_channels, kernel_size, stride) in enumerate(conv_layer_config):
            # layer_norm: every block normalised; group_norm: only the first (as in wav2vec 2.0 base).
            norm = "layer_norm" if mode == "layer_norm" else ("group_norm" if i == 0 else None)
            blocks.append(ConvBlock(in_channels, out_channels, kernel_size, stride, norm, bias=bias))
            in_channels = out_channels
        self.conv_layers = nn.ModuleList(blocks)
        self.out_channels = in_channels

    def output_lengths(self, lengths: Tensor) -> Tensor:
        """Frames produced from `lengths` samples: n <- max(0, (n - k) // s + 1) per block."""
        for block in self.conv_layers:
            lengths = block.output_lengths(lengths)
        return lengths

    def num_frames(self, samples: int) -> int:
        """`output_lengths` of one Python (or symbolic) int: no tensor, so no host sync or graph break."""
        for block in self.conv_layers:
            samples = max(0, (samples - block.kernel_size) // block.stride + 1)
        return samples

    def min_input_length(self, frames: Tensor) -> Tensor:
        """Fewest samples giving `frames` frames (the receptive field of the last real frame)."""
        for block in reversed(self.conv_layers):
            frames = (frames - 1).clamp_min(0) * block.stride + block.kernel_size
        return frames

    def forward(self, waveforms: Tensor, lengths: Tensor | None = None) -> Tensor:
        """`lengths` (B,) in samples only matters to group-norm statistics (exact over real samples)."""
        if waveforms.dim() != 2:
            raise ValueError(f"waveforms must have shape (batch, samples), got {tuple(waveforms.shape)}")
        x = waveforms.unsqueeze(1)  # (B, 1, samples)
        # Where the fused kernels run (CUDA), the blocks hand each other channels-last (B, C, T) tensors
        # (stored (B, T, C)): cuDNN's NHWC kernels read and write them with no layout transposes (it may wrap a
        # channels-first bf16 conv in two), and the last one is already the contiguous (B, T, C) the projection's
        # LayerNorm reads (channels-first, it would copy it). SPIDR_FAST_REFERENCE_OPS=frontend_layout: off.
        fused = isinstance(self.conv_layers[0].layer_norm, ChannelLayerNorm)
        channels_last = True if fused and _dispatch.use_fused(waveforms.device, "frontend_layout") else None
        for block in self.conv_layers:
            x = block(x, lengths, channels_last=channels_last)
            lengths = None  # only block 0 can hold a GroupNorm
        return x.transpose(1, 2)  # (B, C, T) -> (B, T, C)


class FeatureProjection(nn.Module):
    """LayerNorm(C) -> Linear(C -> D)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.layer_norm = nn.LayerNorm(in_features)
        self.projection = nn.Linear(in_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.projection(self.layer_norm(x))
