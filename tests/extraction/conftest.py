"""Tiny models, checkpoints and audio folders for the extraction tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import spidr_fast
from spidr_fast.checkpoint import build_model

TINY = {
    "extractor_conv_layer_config": [[16, 10, 5]] + [[16, 3, 2]] * 4 + [[16, 2, 2]] * 2,
    "encoder_embed_dim": 32,
    "encoder_num_heads": 4,
    "encoder_num_layers": 3,
    "encoder_ff_interm_features": 64,
    "encoder_pos_conv_kernel": 15,
    "encoder_pos_conv_groups": 4,
    "codebook_size": 16,
    "num_codebooks": 2,
}


def tiny_model(model_type: str = "spidr", seed: int = 0, **overrides: object) -> spidr_fast.DinoSR:
    torch.manual_seed(seed)
    config_class = spidr_fast.SpidRConfig if model_type == "spidr" else spidr_fast.DinoSRConfig
    model = build_model(config_class(**{**TINY, **overrides}))
    with torch.no_grad():  # codewords with unequal counts, so the division by counts matters
        for codebook in model.codebooks:
            codebook.counts.uniform_(0.5, 3.0)
    return model.eval()


def write_audio(
    path: Path, samples: int | np.ndarray, *, sample_rate: int = 16_000, seed: int = 0, **kw: object
) -> Path:
    data = samples if isinstance(samples, np.ndarray) else 0.1 * np.random.default_rng(seed).standard_normal(samples)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.asarray(data, dtype=np.float32), sample_rate, **kw)
    return path


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread: tiny models on shared cores run far faster without oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SpidR saved in the reference's format: model.pt + config.json."""
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    return spidr_fast.save_model(tiny_model(), path)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """Good files of varied lengths, two levels deep, in wav and flac."""
    root = tmp_path / "corpus"
    for i, n in enumerate([400, 1234, 3200, 8000, 16000, 20000]):
        write_audio(root / f"spk{i % 2}" / "sess" / f"utt{i}.{'flac' if i % 2 else 'wav'}", n, seed=i)
    write_audio(root / "top.wav", 5000, seed=9)
    return root
