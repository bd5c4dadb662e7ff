"""`spidr-fast abx`: a clear message without fastabx; with it, one zerospeech_abx call per layer and a table.

fastabx needs Python >= 3.12 (this environment has 3.11): the second test stands a recording
`fastabx.zerospeech_abx` in for it, which checks what spidr_fast passes (files, extensions, frame
rate, features per layer), not fastabx's scores."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from spidr_fast.__main__ import main
from spidr_fast.metrics import item_file


def test_abx_without_fastabx(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "fastabx", None)  # import fastabx -> ImportError
    assert main(["abx", str(tmp_path / "x.item"), str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "needs the fastabx package" in err and "Python >= 3.12" in err


def test_abx_layer_sweep_calls_fastabx_per_layer(monkeypatch, tmp_path, capsys):
    feats = tmp_path / "feats"
    feats.mkdir()
    for fileid in ("a", "b"):
        for layer in (4, 6):
            np.save(feats / f"{fileid}.layer{layer}.npy", np.full((5, 3), layer, dtype=np.float16))
        np.save(feats / f"{fileid}.units.npy", np.zeros(5, dtype=np.int64))
    item = tmp_path / "x.item"
    item_file({"a": ["sil", "k", "sil"], "b": ["sil", "t", "sil"]}, item)
    calls = []

    def zerospeech_abx(item_path, root, **kw):
        found = sorted(Path(root).rglob(f"*{kw['extension']}"))
        features = [kw["feature_maker"](p) for p in found]
        calls.append({"item": item_path, "root": root, "files": [p.name for p in found], **kw})
        return float(features[0][0, 0]) / 100  # the layer number, as an error rate, to see it in the table

    monkeypatch.setitem(sys.modules, "fastabx", types.SimpleNamespace(zerospeech_abx=zerospeech_abx))
    assert main(["abx", str(item), str(feats), "--layers", "4,6", "--speaker", "across"]) == 0
    assert [c["files"] for c in calls] == [["a.layer4.npy", "b.layer4.npy"], ["a.layer6.npy", "b.layer6.npy"]]
    assert all(c["frequency"] == 50 and c["speaker"] == "across" and c["item"] == item for c in calls)
    maker = calls[0]["feature_maker"]
    assert maker(feats / "a.layer4.npy").dtype == torch.float32
    out = capsys.readouterr().out
    assert "| layer4 | 4.00 |" in out and "| layer6 | 6.00 |" in out
    assert main(["abx", str(item), str(feats), "--layers", "5"]) == 2
    assert "no array named 'layer5'" in capsys.readouterr().err


@pytest.mark.skipif(sys.version_info < (3, 12), reason="fastabx needs Python >= 3.12")
def test_abx_with_real_fastabx(tmp_path, capsys):
    pytest.importorskip("fastabx")
    rng = np.random.default_rng(0)
    alignments, feats = {}, tmp_path / "feats"
    feats.mkdir()
    for i in range(12):
        phones = ["sil"] * 4 + [["a", "b", "c"][j % 3] for j in range(i, i + 6) for _ in range(8)] + ["sil"] * 4
        fileid = f"spk{i % 2}_{i:03d}"
        alignments[fileid] = phones
        onehot = {"a": 0, "b": 1, "c": 2, "sil": 3}
        frames = [onehot[p] for p in phones[::2]]
        np.save(
            feats / f"{fileid}.npy",
            (np.eye(4)[frames] + 0.1 * rng.standard_normal((len(frames), 4))).astype(np.float32),
        )
    item_file(alignments, tmp_path / "x.item")
    assert main(["abx", str(tmp_path / "x.item"), str(feats), "--context", "any"]) == 0
    error = float(capsys.readouterr().out.strip().splitlines()[-1].split("|")[2])
    assert error < 10  # one-hot phones plus small noise: nearly always discriminated
