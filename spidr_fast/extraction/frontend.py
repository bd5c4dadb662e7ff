"""The conv front-end in channels-last layout, for CPU inference (extractor_mode="layer_norm").

The model's blocks run Conv1d on (B, C, T), then transpose -> LayerNorm over C -> transpose ->
GELU. On the CPU the transposed LayerNorm and the 1-input-channel first conv dominate the small
blocks. Here the activations stay (B, T, C): each block is one GEMM on the unfolded windows
(B, T', k * C_in) @ (k * C_in, C_out) (a window of k frames of a contiguous (T, C) tensor is k * C
contiguous numbers: the unfold is a strided view, materialised once), then a LayerNorm over the
contiguous last dimension and GELU. Kernel-3 stride-2 blocks (4 of SpidR's 7) use a polyphase
Winograd form with 7/9 of the multiplications (`_conv3_stride2`). Same weights, same math; only
the summation order of the conv differs (measured <= 1e-6 relative on the base config). The
output is (B, frames, C), what the projection takes, so the model's final transpose disappears
too. The first three blocks run in time tiles so that their outputs (64, 32 and 16 MB per 10 s
of audio) stay in the cache between blocks. Measured times: `bench/results/extraction_cpu.md`.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from spidr_fast.framing import num_frames


class ChannelsLastFrontend(nn.Module):
    """(B, S) waveforms -> (B, frames, C), from the model's `ConvFeatureExtractor` in layer_norm mode."""

    def __init__(self, feature_extractor: nn.Module, *, tile_frames: int = 512, tiled_blocks: int = 3):
        super().__init__()
        if tile_frames < 1 or not 0 <= tiled_blocks <= len(feature_extractor.conv_layers):
            raise ValueError(
                f"tile_frames must be >= 1 and tiled_blocks in 0..{len(feature_extractor.conv_layers)}, "
                f"got {tile_frames} and {tiled_blocks}"
            )
        self.tile_frames, self.tiled_blocks = tile_frames, tiled_blocks
        self.blocks = list(feature_extractor.conv_layers)
        for block in self.blocks:
            if not isinstance(block.layer_norm, nn.LayerNorm):
                raise ValueError("the channels-last front-end needs extractor_mode='layer_norm'")
        # (C_out, C_in, k) -> (k, C_in, C_out) -> (k * C_in, C_out): row j * C_in + c multiplies frame j, channel c.
        self.weights = [b.conv.weight.detach().permute(2, 1, 0).reshape(-1, b.conv.out_channels) for b in self.blocks]
        self.weights = [w.contiguous() for w in self.weights]
        # Per tap (C_in, C_out), then (A + B) / 2 and (A - B) / 2 of the outer taps, for `_conv3_stride2`.
        self.taps = [
            [*(b.conv.weight.detach()[:, :, j].t().contiguous() for j in range(3))] if _polyphase(b) else None
            for b in self.blocks
        ]
        self.taps = [t if t is None else [*t, (t[0] + t[2]) / 2, (t[0] - t[2]) / 2] for t in self.taps]

    def forward(self, waveforms: Tensor) -> Tensor:
        x = waveforms.unsqueeze(-1)  # (B, S, 1)
        head = range(self.tiled_blocks)
        frames = self.output_frames(x.shape[1], head)
        if self.tiled_blocks == 0 or frames <= self.tile_frames:
            return self._run(x, range(len(self.blocks)))
        # Time tiles through the first blocks: block 0's output (B, S / 5, C) is 64 MB per 10 s, far
        # beyond the caches; per tile it stays cached while the next block consumes it. Tiles
        # overlap by the halo their convs need.
        out = x.new_empty(x.shape[0], frames, self.blocks[self.tiled_blocks - 1].conv.out_channels)
        for start in range(0, frames, self.tile_frames):
            stop = min(start + self.tile_frames, frames)
            first, last = self.input_span(start, stop, head)
            out[:, start:stop] = self._run(x[:, first:last], head)
        return self._run(out, range(self.tiled_blocks, len(self.blocks)))

    def output_frames(self, steps: int, blocks: range) -> int:
        return int(num_frames(steps, [_layer(self.blocks[i]) for i in blocks]))

    def input_span(self, start: int, stop: int, blocks: range) -> tuple[int, int]:
        """Input steps [first, last) that output frames [start, stop) of `blocks` read."""
        for i in reversed(blocks):
            k, s = self.blocks[i].kernel_size, self.blocks[i].stride
            start, stop = s * start, s * (stop - 1) + k
        return start, stop

    def _run(self, x: Tensor, blocks: range) -> Tensor:
        """Blocks `blocks` on a (B, T, C_in) tensor: conv, bias, LayerNorm over C, GELU."""
        for i in blocks:
            block, weight, taps = self.blocks[i], self.weights[i], self.taps[i]
            batch, steps, channels = x.shape
            k, s = block.kernel_size, block.stride
            out_steps = int(num_frames(steps, [_layer(block)]))
            if taps is not None and out_steps >= 3:
                y = _conv3_stride2(x, [t.to(x.dtype) for t in taps], out_steps)
            else:
                # (B, T, C) -> (B, T', k * C): overlapping windows (k > s), so copied once for the GEMM.
                windows = x.as_strided((batch, out_steps, k * channels), (x.stride(0), s * channels, 1)).contiguous()
                y = windows @ weight.to(x.dtype)
            if block.conv.bias is not None:
                y = y + block.conv.bias
            norm = block.layer_norm
            x = F.gelu(F.layer_norm(y, norm.normalized_shape, norm.weight, norm.bias, norm.eps))
        return x


def _layer(block: nn.Module) -> tuple[int, int, int]:
    """A conv block as a `spidr_fast.framing` layer: (out_channels, kernel, stride)."""
    return block.conv.out_channels, block.kernel_size, block.stride


def _polyphase(block: nn.Module) -> bool:
    return block.kernel_size == 3 and block.stride == 2


def _conv3_stride2(x: Tensor, taps: list[Tensor], out_steps: int) -> Tensor:
    """Kernel-3 stride-2 conv of (B, T, C_in) with 7 GEMM rows per 3 outputs instead of 9: (B, T', C_out).

    y[t] = e[t] A + o[t] W1 + e[t + 1] B with e[t] = x[2t], o[t] = x[2t + 1]. The odd phase is one
    GEMM over all outputs. The even phase is a 2-tap filter, done per 3 outputs as Winograd F(3, 2)
    with 4 products (points 0, 1, -1, inf): for e0..e3 = e[3q..3q + 3],
        m1 = (e1 + e2) (A + B) / 2,  m2 = (e2 - e1) (A - B) / 2,  s = m1 + m2,
        y[3q] += (e0 - e2) A + s,  y[3q + 1] += m1 - m2,  y[3q + 2] += (e3 - e1) B + s.
    Only +-1 and 1/2 appear, so rounding stays at a few ulps (2.2e-6 max abs on base-config
    features vs the direct conv). Inputs are strided views (no unfold copy). Faster than F(2, 2)
    (5 rows per 2 outputs) on the big blocks (bench/results/extraction_cpu.md).
    """
    a, w1, b, half_sum, half_difference = taps
    y = x[:, 1 : 2 * out_steps : 2] @ w1  # (B, T', C_out), the odd phase
    q = out_steps // 3
    e0, e1, e2, e3 = (x[:, j : 6 * q + j : 6] for j in (0, 2, 4, 6))  # (B, q, C_in)
    m1 = (e1 + e2) @ half_sum
    m2 = (e2 - e1) @ half_difference
    s = m1 + m2
    m1 -= m2
    y[:, 0 : 3 * q : 3] += (e0 - e2) @ a
    y[:, 0 : 3 * q : 3] += s
    y[:, 1 : 3 * q : 3] += m1
    y[:, 2 : 3 * q : 3] += (e3 - e1) @ b
    y[:, 2 : 3 * q : 3] += s
    for t in range(3 * q, out_steps):  # the last one or two outputs
        y[:, t] += x[:, 2 * t] @ a + x[:, 2 * t + 2] @ b
    return y
