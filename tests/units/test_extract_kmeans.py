"""`extract --units kmeans:PATH` / FeatureExtractor(units=KMeans): the nearest centroid of the layer's features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import spidr_fast
from spidr_fast.__main__ import main
from spidr_fast.units import KMeans
from tests.conftest import FIXTURE_DIR

CKPT = FIXTURE_DIR / "model.pt"


def extract(*args: object) -> int:
    return main(["extract", *map(str, args), "--checkpoint", str(CKPT), "--device", "cpu", "--no-progress"])


@pytest.mark.parametrize("after_residual", [False, True])
def test_extract_kmeans_units_are_the_nearest_centroids_of_the_features(corpus, tmp_path, after_residual):
    flag = ["--after-residual"] if after_residual else []
    assert extract(corpus / "wavs", tmp_path / "feats", "--layer", "2", *flag) == 0
    files = sorted((tmp_path / "feats").glob("*.npy"))
    model = KMeans(5, iters=10, device="cpu").fit([np.load(p) for p in files])
    model.save(tmp_path / "km.pt")
    # layer 2 has no head or codebook (those are on 3..4): k-means units exist for any layer
    args = ["--layer", "2", "--units", f"kmeans:{tmp_path / 'km.pt'}", *flag]
    assert extract(corpus / "wavs", tmp_path / "both", *args) == 0
    for path in files:
        features = np.load(tmp_path / "both" / f"{path.stem}.layer2.npy")
        units = np.load(tmp_path / "both" / f"{path.stem}.units.npy")
        assert np.array_equal(features, np.load(path))
        assert units.dtype == np.int64 and np.array_equal(units, model.predict(features))
    # units only: the same units, the layer from --units-layer
    only = ["--units", f"kmeans:{tmp_path / 'km.pt'}", "--units-only", "--units-layer", "2", *flag]
    assert extract(corpus / "wavs", tmp_path / "only", *only) == 0
    for path in files:
        assert np.array_equal(
            np.load(tmp_path / "only" / path.name), np.load(tmp_path / "both" / f"{path.stem}.units.npy")
        )


def test_feature_extractor_takes_a_fitted_kmeans(corpus):
    model = spidr_fast.load_model(CKPT)
    wave = torch.randn(16000)
    features = spidr_fast.FeatureExtractor(model, layers=[1], device="cpu")([wave])[0]["layer1"]
    km = KMeans(3, iters=3, device="cpu").fit(features)
    out = spidr_fast.FeatureExtractor(model, layers=[1], units=km, device="cpu")([wave])[0]
    assert torch.equal(out["units"], km.predict(out["layer1"]))


def test_kmeans_units_errors(tmp_path, corpus, capsys):
    model = spidr_fast.load_model(CKPT)
    km = KMeans(2, iters=1, device="cpu").fit(np.random.default_rng(0).standard_normal((10, 7)))
    with pytest.raises(ValueError, match="7-dim"):
        spidr_fast.FeatureExtractor(model, layers=[1], units=km, device="cpu")
    with pytest.raises(ValueError, match="not fitted"):
        spidr_fast.FeatureExtractor(model, layers=[1], units=KMeans(2), device="cpu")
    with pytest.raises(ValueError, match="give units_layer"):
        spidr_fast.FeatureExtractor(model, layers=[], units="heads", device="cpu")
    (tmp_path / "bad.pt").write_bytes(b"x")
    assert extract(corpus / "wavs", tmp_path / "o", "--layer", "1", "--units", f"kmeans:{tmp_path / 'bad.pt'}") == 2
    assert "bad.pt: not a k-means file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        extract(corpus / "wavs", tmp_path / "o", "--units", "kmeans")
    assert "invalid choice 'kmeans' (heads, codebooks, codebook-probs or kmeans:PATH)" in capsys.readouterr().err
    assert not Path(tmp_path / "o").exists() or not list(Path(tmp_path / "o").rglob("*.npy"))
