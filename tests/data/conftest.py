"""Shared fixtures for the data tests: tiny 16 kHz wav/flac/ogg files written on the fly."""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf


def write_tone(
    path: Path,
    num_samples: int,
    *,
    sample_rate: int = 16_000,
    channels: int = 1,
    fmt: str | None = None,
    seed: int = 0,
) -> Path:
    """A noisy tone of `num_samples` samples (float in [-0.5, 0.5]) written with soundfile."""
    rng = np.random.default_rng(seed)
    t = np.arange(num_samples) / sample_rate
    x = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(num_samples)
    data = np.repeat(x[:, None], channels, axis=1) if channels > 1 else x
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, data.astype(np.float32), sample_rate, format=fmt)
    return path


@pytest.fixture
def audio_dir(tmp_path: Path) -> Path:
    """A folder with 5 good utterances in wav/flac/ogg, two levels deep."""
    root = tmp_path / "corpus"
    write_tone(root / "a" / "u1.wav", 4000, seed=1)
    write_tone(root / "a" / "u2.flac", 3000, seed=2)
    write_tone(root / "b" / "u3.wav", 5200, seed=3)
    write_tone(root / "b" / "u4.ogg", 2500, seed=4)
    write_tone(root / "u5.wav", 6000, seed=5)
    return root


@pytest.fixture
def tone() -> Callable[..., Path]:
    """`write_tone(path, num_samples, *, sample_rate, channels, fmt, seed) -> path`."""
    return write_tone
