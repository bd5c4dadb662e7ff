"""Merged units (runs), the ABX item file, mean run length and `spidr-fast units-report`."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from spidr_fast import metrics, units
from spidr_fast.__main__ import main
from spidr_fast.metrics import ITEM_HEADER, bitrate, item_file, mean_run_length, run_starts, unit_metrics
from spidr_fast.units import expand_runs, merge_runs
from spidr_fast.units_report import read_units
from tests.conftest import FIXTURE_DIR


@pytest.mark.parametrize("seed", range(5))
def test_merged_units_expand_back_exactly(seed):
    rng = np.random.default_rng(seed)
    frames = np.repeat(rng.integers(0, 4, 50), rng.integers(1, 6, 50))  # runs, some neighbours equal
    units, durations = merge_runs(frames)
    assert durations.sum() == frames.size and (durations >= 1).all()
    assert (units[1:] != units[:-1]).all()  # maximal runs
    assert np.array_equal(expand_runs(units, durations), frames)
    assert mean_run_length([frames]) == pytest.approx(frames.size / units.size)


def test_merge_runs_edges():
    assert [a.tolist() for a in merge_runs(np.array([7]))] == [[7], [1]]
    assert [a.tolist() for a in merge_runs(np.array([3, 3, 1, 3]))] == [[3, 1, 3], [2, 1, 1]]
    assert [a.size for a in merge_runs(np.zeros(0, dtype=np.int64))] == [0, 0]
    with pytest.raises(ValueError, match="1-D"):
        merge_runs(np.zeros((2, 2)))
    with pytest.raises(ValueError, match=">= 1 frame"):
        expand_runs(np.array([1, 2]), np.array([1, 0]))


def test_run_starts_is_what_every_run_counter_uses(tmp_path, monkeypatch):
    assert run_starts(np.array([3, 3, 1, 3])).tolist() == [0, 2, 3]
    assert run_starts(["sil", "sil", "ah"]).tolist() == [0, 2] and run_starts([5]).tolist() == [0]
    assert run_starts(np.zeros(0)).dtype == np.int64 and run_starts(np.zeros(0)).size == 0
    rng = np.random.default_rng(0)
    frames = np.repeat(rng.integers(0, 4, 40), rng.integers(1, 6, 40))
    starts = run_starts(frames)
    u, durations = merge_runs(frames)
    assert np.array_equal(u, frames[starts]) and np.array_equal(np.cumsum(durations)[:-1], starts[1:])
    assert mean_run_length([frames, frames[:0]]) == pytest.approx(frames.size / starts.size)
    deduplicated = bitrate([frames[starts]], deduplicate=False) * starts.size / frames.size
    assert bitrate([frames]) == pytest.approx(deduplicated)
    # each of them finds its runs with run_starts
    calls = []
    spy = lambda s: calls.append(len(s)) or run_starts(s)
    monkeypatch.setattr(metrics, "run_starts", spy)
    monkeypatch.setattr(units, "run_starts", spy)
    merge_runs(frames), mean_run_length([frames]), bitrate([frames])
    item_file({"a_1": ["sil", "k", "k", "sil"]}, tmp_path / "x.item")
    assert calls == [frames.size] * 3 + [4]


def test_item_file_rows(tmp_path):
    alignments = {
        "6295-244435-0000": ["sil"] * 3 + ["ah"] * 2 + ["n"] * 4 + ["sil"] + ["t"] * 2 + ["sil"] * 5,
        "spk01_00002": ["k", "k", "iy", "s"],
    }
    assert item_file(alignments, tmp_path / "a.item") == 4
    assert (tmp_path / "a.item").read_text().splitlines() == [
        ITEM_HEADER,
        "6295-244435-0000 0.0300 0.0500 ah sil n 6295",
        "6295-244435-0000 0.0500 0.0900 n ah sil 6295",
        "6295-244435-0000 0.1000 0.1200 t sil sil 6295",
        "spk01_00002 0.0200 0.0300 iy k s spk01",
    ]
    item_file(alignments, tmp_path / "b.item", speakers={"spk01_00002": "X"}, ignore=())
    assert (tmp_path / "b.item").read_text().splitlines()[-1].endswith(" X")
    assert len((tmp_path / "b.item").read_text().splitlines()) == 1 + 5  # the middle sil is a row now


def test_item_file_from_the_builtin_corpus(corpus, alignments, tmp_path):
    rows = item_file(corpus, tmp_path / "corpus.item")
    lines = (tmp_path / "corpus.item").read_text().splitlines()
    assert lines[0] == ITEM_HEADER and len(lines) == rows + 1 > 50
    for line in lines[1:]:
        fileid, onset, offset, phone, prev, nxt, speaker = line.split(" ")
        labels = alignments[fileid]
        first, last = round(float(onset) * 100), round(float(offset) * 100)
        assert set(labels[first:last]) == {phone} and phone != "sil"
        assert labels[first - 1] == prev and labels[last] == nxt  # the neighbouring tokens
        assert speaker == fileid.split("_")[0]  # the corpus's speaker field


@pytest.fixture(scope="module")
def extracted_units(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("units")
    args = ["extract", corpus / "wavs", out, "--checkpoint", FIXTURE_DIR / "model.pt", "--device", "cpu"]
    assert main([*map(str, args), "--units", "heads", "--units-layer", "3", "--units-only", "--no-progress"]) == 0
    return out


def test_units_report(extracted_units, corpus, alignments, tmp_path, capsys):
    png, js = tmp_path / "fig.png", tmp_path / "m.json"
    argv = ["units-report", str(extracted_units), str(corpus), "--png", str(png), "--json", str(js)]
    assert main([*argv, "--ignore", "sil"]) == 0
    printed = capsys.readouterr().out
    units = read_units(extracted_units)
    assert len(units) == 8
    expected = unit_metrics(units, alignments, ignore=["sil"])
    pnmi = float(re.search(r"PNMI\s+([\d.]+)", printed).group(1))
    assert pnmi == pytest.approx(expected.pnmi, abs=1e-4)
    assert f"{expected.mean_run_length:.4f}" in printed and f"{expected.bitrate:.4f}" in printed
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert '"phone purity"' in js.read_text()


def test_units_report_errors(tmp_path, corpus, capsys):
    (tmp_path / "none").mkdir()
    assert main(["units-report", str(tmp_path / "none"), str(corpus)]) == 2
    assert "no units files" in capsys.readouterr().err
    (tmp_path / "u").mkdir()
    np.save(tmp_path / "u" / "zzz.units.npy", np.array([1, 2]))
    assert main(["units-report", str(tmp_path / "u"), str(corpus)]) == 2
    assert "matches a fileid" in capsys.readouterr().err
