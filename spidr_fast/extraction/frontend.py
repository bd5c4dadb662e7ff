"""The conv front-end in channels-last layout, for CPU inference (extractor_mode="layer_norm").

The model's blocks run Conv1d on (B, C, T), then transpose -> LayerNorm over C -> transpose ->
GELU. On the CPU the transposed LayerNorm and the 1-input-channel first conv dominate the small
blocks. Here the activations stay (B, T, C): each block is one GEMM on the unfolded windows
(B, T', k * C_in) @ (k * C_in, C_out) (a window of k frames of a contiguous (T, C) tensor is k * C
contiguous numbers: the unfold is a strided view, materialised once), then a LayerNorm over the
contiguous last dimension and GELU. Same weights, same math; only the summation order of the
conv differs (measured <= 1e-6 relative on the base config). The output is (B, frames, C), what
the projection takes, so the model's final transpose disappears too.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class ChannelsLastFrontend(nn.Module):
    """(B, S) waveforms -> (B, frames, C), from a `spidr_fast` FeatureExtractor in layer_norm mode."""

    def __init__(self, feature_extractor: nn.Module):
        super().__init__()
        self.blocks = list(feature_extractor.conv_layers)
        for block in self.blocks:
            if not isinstance(block.layer_norm, nn.LayerNorm):
                raise ValueError("the channels-last front-end needs extractor_mode='layer_norm'")
        # (C_out, C_in, k) -> (k, C_in, C_out) -> (k * C_in, C_out): row j * C_in + c multiplies frame j, channel c.
        self.weights = [b.conv.weight.detach().permute(2, 1, 0).reshape(-1, b.conv.out_channels) for b in self.blocks]
        self.weights = [w.contiguous() for w in self.weights]

    def forward(self, waveforms: Tensor) -> Tensor:
        x = waveforms.unsqueeze(-1)  # (B, S, 1)
        for block, weight in zip(self.blocks, self.weights):
            batch, steps, channels = x.shape
            k, s = block.kernel_size, block.stride
            out_steps = (steps - k) // s + 1
            # (B, T, C) -> (B, T', k * C): overlapping windows (k > s), so copied once for the GEMM.
            windows = x.as_strided((batch, out_steps, k * channels), (x.stride(0), s * channels, 1)).contiguous()
            y = windows @ weight.to(x.dtype)
            if block.conv.bias is not None:
                y = y + block.conv.bias
            norm = block.layer_norm
            x = F.gelu(F.layer_norm(y, norm.normalized_shape, norm.weight, norm.bias, norm.eps))
        return x
