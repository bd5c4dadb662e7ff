"""`spidr-fast kmeans`: on a folder written by `spidr-fast extract` (npy and pt), errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from spidr_fast.__main__ import main
from spidr_fast.units import KMeans
from tests.conftest import FIXTURE_DIR


@pytest.fixture(scope="module")
def extracted(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The corpus's wavs through `spidr-fast extract` with the fixture model: one layer (npy), two layers + units
    (npy), and two layers (pt)."""
    out = tmp_path_factory.mktemp("extracted")
    common = ["--checkpoint", FIXTURE_DIR / "model.pt", "--device", "cpu", "--no-progress"]
    runs = {
        "one": ["--layer", "2"],
        "several": ["--layer", "1", "--layer", "3", "--units", "heads"],
        "pt": ["--layer", "1", "--layer", "3", "--format", "pt"],
    }
    for name, extra in runs.items():
        assert main(["extract", str(corpus / "wavs"), str(out / name), *map(str, common + extra)]) == 0
    return {name: out / name for name in runs}


def layer_frames(folder: Path, pattern: str) -> np.ndarray:
    return np.concatenate([np.load(p) for p in sorted(folder.rglob(pattern))])


def test_kmeans_on_extracted_npy(extracted, tmp_path, capsys):
    out = tmp_path / "km.pt"
    assert main(["kmeans", str(extracted["one"]), str(out), "--k", "6", "--iters", "5", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("inertia") >= 5 and "iteration    1: inertia" in printed
    model = KMeans.load(out)
    # the same fit as the Python API on the same frames, in the same (sorted file) order
    same = KMeans(6, iters=5, device="cpu").fit(layer_frames(extracted["one"], "*.npy"))
    assert torch.equal(model.cluster_centers_, same.cluster_centers_)
    assert [p.name for p in tmp_path.iterdir()] == ["km.pt"]


def test_kmeans_picks_the_named_array(extracted, tmp_path):
    args = ["--k", "4", "--iters", "3", "--device", "cpu", "--no-progress"]
    assert main(["kmeans", str(extracted["several"]), str(tmp_path / "a.pt"), *args]) == 2  # layer1 or layer3?
    assert main(["kmeans", str(extracted["several"]), str(tmp_path / "a.pt"), *args, "--name", "layer1"]) == 0
    assert main(["kmeans", str(extracted["pt"]), str(tmp_path / "b.pt"), *args, "--name", "layer1"]) == 0
    npy, pt = KMeans.load(tmp_path / "a.pt"), KMeans.load(tmp_path / "b.pt")
    assert torch.equal(npy.cluster_centers_, pt.cluster_centers_)  # the same frames from either format
    layer1 = layer_frames(extracted["several"], "*.layer1.npy")
    assert torch.equal(npy.cluster_centers_, KMeans(4, iters=3, device="cpu").fit(layer1).cluster_centers_)


def test_kmeans_max_frames(extracted, tmp_path):
    args = ["--k", "4", "--iters", "3", "--device", "cpu", "--no-progress", "--max-frames", "100", "--seed", "5"]
    assert main(["kmeans", str(extracted["one"]), str(tmp_path / "a.pt"), *args]) == 0
    frames = layer_frames(extracted["one"], "*.npy")
    same = KMeans(4, iters=3, device="cpu", max_frames=100, seed=5).fit(frames)
    assert torch.equal(KMeans.load(tmp_path / "a.pt").cluster_centers_, same.cluster_centers_)


def test_kmeans_cli_errors(extracted, tmp_path, capsys):
    args = ["--k", "4", "--device", "cpu", "--no-progress"]
    assert main(["kmeans", str(tmp_path / "missing"), str(tmp_path / "a.pt"), *args]) == 2
    assert "missing: not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["kmeans", str(tmp_path / "empty"), str(tmp_path / "a.pt"), *args]) == 2
    assert "no .npy or .pt feature files" in capsys.readouterr().err
    assert main(["kmeans", str(extracted["several"]), str(tmp_path / "a.pt"), *args, "--name", "layer7"]) == 2
    assert "no array named 'layer7' (there are: layer1, layer3, units)" in capsys.readouterr().err
    assert main(["kmeans", str(extracted["one"]), str(tmp_path / "a.pt"), "--k", "100000", "--device", "cpu"]) == 2
    assert "needs at least 100000 frames" in capsys.readouterr().err
    assert not (tmp_path / "a.pt").exists()


def test_kmeans_on_audio_with_a_checkpoint_equals_on_extracted_features(corpus, extracted, tmp_path, capsys):
    """--checkpoint: features extracted in memory (none written) give the centroids of `extract` + `kmeans`."""
    args = ["--k", "6", "--iters", "5", "--device", "cpu", "--no-progress", "--max-frames", "200", "--seed", "2"]
    assert main(["kmeans", str(extracted["one"]), str(tmp_path / "from_files.pt"), *args]) == 0
    audio = [str(corpus / "wavs"), str(tmp_path / "from_audio.pt"), "--checkpoint", str(FIXTURE_DIR / "model.pt")]
    assert main(["kmeans", *audio, "--layer", "2", *args]) == 0
    assert "extracted in memory" in capsys.readouterr().out
    a, b = KMeans.load(tmp_path / "from_files.pt"), KMeans.load(tmp_path / "from_audio.pt")
    assert torch.equal(a.cluster_centers_, b.cluster_centers_)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["from_audio.pt", "from_files.pt"]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.wav").write_bytes(b"not audio")
    assert (
        main(
            ["kmeans", str(tmp_path / "bad"), str(tmp_path / "c.pt"), "--checkpoint", audio[3], "--layer", "2", *args]
        )
        == 2
    )
    assert "x.wav" in capsys.readouterr().err
