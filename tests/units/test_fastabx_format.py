"""`extract --format pt --flat` writes what fastabx reads as it is; `kmeans`, `abx` and `units-report` read it.

fastabx (Python >= 3.12, not installed here) builds its dataset from `find_all_files(root, ".pt")`
(every `*.pt` below root, keyed by its path relative to root without the extension), loads each with
`torch.load` and slices frames [ceil(onset * 50 - 0.5), floor(offset * 50 - 0.5) + 1) per item row:
the checks below do the same, on the item file `spidr_fast.metrics.item_file` writes."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from spidr_fast.__main__ import main
from spidr_fast.abx import sources
from spidr_fast.data.manifest import read_manifest
from spidr_fast.kmeans import FeatureFolder
from spidr_fast.metrics import item_file
from spidr_fast.units_report import read_units
from tests.conftest import FIXTURE_DIR

COMMON = ["--checkpoint", str(FIXTURE_DIR / "model.pt"), "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def nested(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The corpus's wavs in speaker folders, as LibriSpeech's are (`spk00/spk00_00001.wav`)."""
    root = tmp_path_factory.mktemp("nested")
    for wav in sorted((corpus / "wavs").glob("*.wav")):
        (root / wav.stem.split("_")[0]).mkdir(exist_ok=True)
        shutil.copy(wav, root / wav.stem.split("_")[0] / wav.name)
    return root


def fastabx_frames(item: Path) -> dict[str, int]:
    """fileid -> the frames fastabx slices up to at 50 Hz (the largest `end` of its rows)."""
    need: dict[str, int] = {}
    for line in item.read_text().splitlines()[1:]:
        fileid, _, offset = line.split()[:3]
        need[fileid] = max(need.get(fileid, 0), math.floor(float(offset) * 50 - 0.5) + 1)
    return need


def test_flat_pt_is_what_fastabx_reads(corpus, nested, alignments, tmp_path, capsys):
    out = tmp_path / "feats"
    assert main(["extract", str(nested), str(out), "--layer", "2", "--format", "pt", "--flat", *COMMON]) == 0
    item = tmp_path / "dev.item"
    item_file(corpus, item)
    found = {str(p.relative_to(out)).removesuffix(".pt"): p for p in out.rglob("*.pt")}  # fastabx's find_all_files
    assert sorted(found) == sorted(alignments) == sorted(fastabx_frames(item))  # flat: fileid.pt
    npy = tmp_path / "npy"
    assert main(["extract", str(corpus / "wavs"), str(npy), "--layer", "2", *COMMON]) == 0
    samples = {e.fileid: e.num_samples for e in read_manifest(corpus / "manifest.csv")}
    for fileid, frames in fastabx_frames(item).items():
        features = torch.load(found[fileid])  # fastabx's default feature_maker
        assert type(features) is torch.Tensor and features.dtype == torch.float32 and features.ndim == 2
        assert features.shape[0] == (samples[fileid] - 400) // 320 + 1  # 50 Hz: a 20 ms step, 25 ms window
        assert frames <= features.shape[0]
        torch.testing.assert_close(features, torch.from_numpy(np.load(npy / f"{fileid}.npy")), rtol=0, atol=0)

    # spidr-fast kmeans and abx read the same folder
    assert FeatureFolder(out).name is None and len(list(FeatureFolder(out))) == len(alignments)
    assert main(["kmeans", str(out), str(tmp_path / "km.pt"), "--k", "4", "--iters", "2", "--device", "cpu"]) == 0
    [(_, extension, maker)] = sources(out, None)
    assert extension == ".pt" and torch.equal(maker(found["spk00_00000"]), torch.load(found["spk00_00000"]))

    # --units-only --format pt: the units tensor itself, read by units-report and by extract --units kmeans:
    units = tmp_path / "units"
    km = ["--units", f"kmeans:{tmp_path / 'km.pt'}", "--units-only", "--layer", "2", "--format", "pt", "--flat"]
    assert main(["extract", str(nested), str(units), *km, *COMMON]) == 0
    read = read_units(units)
    assert sorted(read) == sorted(alignments) and all(u.dtype == np.int64 and u.ndim == 1 for u in read.values())
    assert torch.load(units / "spk00_00000.pt").shape == (len(alignments["spk00_00000"]) // 2,)
    capsys.readouterr()
    # a rerun finds every output complete
    assert main(["extract", str(nested), str(out), "--layer", "2", "--format", "pt", "--flat", *COMMON]) == 0
    assert f"0 written, {len(alignments)} already complete" in capsys.readouterr().err


def test_flat_reports_shared_file_ids(nested, tmp_path, capsys):
    twin = tmp_path / "in"
    shutil.copytree(nested, twin)
    first = sorted(twin.rglob("*.wav"))[0]
    (twin / "other").mkdir()
    shutil.copy(first, twin / "other" / first.name)  # spk00/x.wav and other/x.wav: one file id
    out = tmp_path / "out"
    assert main(["extract", str(twin), str(out), "--layer", "2", "--format", "pt", "--flat", *COMMON]) == 1
    err = capsys.readouterr().err
    assert "2 failed" in err and f"its output name {first.stem!r} is also that of" in err
    assert not (out / f"{first.stem}.pt").exists()
    assert len(list(out.glob("*.pt"))) == len(list(nested.rglob("*.wav"))) - 1
    assert not any(p.is_dir() for p in out.iterdir())  # flat
