"""Features for the k-means tests: Gaussian blobs, and layer outputs of the fixture model on synthetic speech."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import spidr_fast
from spidr_fast.data.corpus import generate_corpus, read_alignments
from spidr_fast.data.manifest import read_manifest
from tests.conftest import FIXTURE_DIR


def blobs(n: int = 1500, centers: int = 6, dim: int = 12, seed: int = 0, std: float = 1.5) -> np.ndarray:
    """(n, dim) fp64 frames around `centers` random means (scikit-learn's make_blobs, without sklearn)."""
    rng = np.random.default_rng(seed)
    means = rng.uniform(-10, 10, (centers, dim))
    return means[rng.integers(centers, size=n)] + std * rng.standard_normal((n, dim))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 synthetic utterances (1-1.5 s) with 10 ms phone alignments."""
    return generate_corpus(tmp_path_factory.mktemp("corpus"), 8, seed=3, min_seconds=1.0, max_seconds=1.5)


@pytest.fixture(scope="session")
def model_features(corpus: Path) -> dict[str, np.ndarray]:
    """fileid -> (frames, 32) fp32 layer-2 outputs of the fixture model."""
    import soundfile as sf

    model = spidr_fast.load_model(FIXTURE_DIR / "model.pt").eval()
    out = {}
    with torch.no_grad():
        for entry in read_manifest(corpus / "manifest.csv"):
            wave = torch.from_numpy(sf.read(entry.path, dtype="float32")[0])
            wave = (wave - wave.mean()) / wave.std()
            out[entry.fileid] = model.get_intermediate_outputs(wave[None], num_layers=2)[-1][0].numpy()
    return out


@pytest.fixture(scope="session")
def alignments(corpus: Path) -> dict[str, list[str]]:
    return read_alignments(corpus)
