"""Span masking speed: C++ (`spidr_fast._C`) vs the NumPy fallback vs straightforward per-row loops.

`torch_loop` is written the way the reference recipe does it (torch ops and Python lists per row,
one tensor element at a time); `loop` is this package's own per-row NumPy loop. Shape: 12 rows x
1000 frames (20 s at 50 Hz, mask_prob 0.8, span 10, static), the reference's batch.
Run: `pytest bench/test_bench_masks.py --benchmark-only`.
"""

from collections.abc import Callable

import numpy as np
import pytest
import torch
from pytest_benchmark.fixture import BenchmarkFixture

from spidr_fast.config import MaskingConfig
from spidr_fast.data import masks
from spidr_fast.data.masks import compute_mask_indices


def torch_loop_masks(batch: int, frames: int, prob: float, length: int, generator: torch.Generator) -> torch.Tensor:
    """Per-row static overlap masking, one Python-level span and offset at a time (reference style)."""
    num = max(2, int(prob * frames / length + float(torch.rand(1, generator=generator))))
    rows = []
    for _ in range(batch):
        lengths = torch.full((num,), length)
        low = int(min(lengths))
        if frames - low <= num:
            low = frames - num - 1
        starts = torch.randperm(frames - low, generator=generator)[:num]
        idx = torch.tensor([starts[j] + k for j in range(len(starts)) for k in range(lengths[j])])
        rows.append(torch.unique(idx[idx < frames]))
    keep = min(len(r) for r in rows)
    out = torch.empty((batch, keep), dtype=torch.int64)
    for i, r in enumerate(rows):
        if len(r) > keep:
            r = r[torch.randperm(len(r), generator=generator)[:keep]].sort().values
        out[i] = r
    return out


def _provider(name: str, batch: int, frames: int) -> Callable[[], object]:
    if name == "torch_loop":
        gen = torch.Generator().manual_seed(0)
        return lambda: torch_loop_masks(batch, frames, 0.8, 10, gen)
    rng = np.random.default_rng(0)
    return lambda: compute_mask_indices((batch, frames), config=MaskingConfig(), rng=rng, backend=name)


PROVIDERS = ["cpp", "numpy", "loop", "torch_loop"]


def _skip_missing(name: str) -> None:
    if name == "cpp" and not masks.has_cpp():
        pytest.skip("spidr_fast._C not built")


@pytest.mark.parametrize("provider", PROVIDERS)
def test_masks_12x1000(benchmark: BenchmarkFixture, provider: str) -> None:
    _skip_missing(provider)
    benchmark.group = "masks 12x1000 static"
    out = benchmark(_provider(provider, 12, 1000))
    assert out.shape[0] == 12


@pytest.mark.parametrize("provider", PROVIDERS)
def test_masks_smoke(benchmark: BenchmarkFixture, provider: str) -> None:
    _skip_missing(provider)
    benchmark.group = "masks 2x100 smoke"
    out = benchmark.pedantic(_provider(provider, 2, 100), rounds=3, iterations=1)
    assert out.shape[0] == 2
