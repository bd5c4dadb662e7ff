"""SpidR's framing, defined once: how many frames the conv feature extractor makes from a sample count.

Each conv layer (out_channels, kernel, stride) maps n samples (or steps) to max(0, (n - kernel) // stride + 1).
With the default layers (SpidR's and DinoSR's, every released checkpoint's), at `SAMPLE_RATE`
(spidr_fast.config): one frame every `HOP` = 320 samples (20 ms), the first needs `RECEPTIVE_FIELD`
= 400 samples (fewer give no frame at all). The data pipeline, the extractor and the benchmarks
use these; the model computes the same rule from its own conv blocks (`ConvFeatureExtractor.output_lengths`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from spidr_fast.config import DEFAULT_CONV_LAYER_CONFIG

# (out_channels, kernel, stride) of SpidR's conv feature extractor.
CONV_LAYERS: tuple[tuple[int, int, int], ...] = tuple(map(tuple, DEFAULT_CONV_LAYER_CONFIG))


def num_frames(num_samples: np.ndarray | int, conv_layers: Sequence[tuple[int, int, int]] = CONV_LAYERS) -> np.ndarray:
    """Frames the conv extractor yields for `num_samples` samples (int64, same shape; 400 -> 1)."""
    n = np.asarray(num_samples, dtype=np.int64)
    for _, kernel, stride in conv_layers:
        n = np.maximum(0, (n - kernel) // stride + 1)
    return n


def receptive_field(conv_layers: Sequence[tuple[int, int, int]] = CONV_LAYERS) -> int:
    """Fewest samples that give one frame."""
    samples = 1
    for _, kernel, stride in reversed(conv_layers):
        samples = (samples - 1) * stride + kernel
    return samples


HOP = math.prod(stride for _, _, stride in CONV_LAYERS)  # samples between frames (320)
RECEPTIVE_FIELD = receptive_field()  # samples of the first frame (400)
