"""`extract --dedup` and `--units-format jsonl`: merged runs expand back to the frame units, the
durations sum to the frame count; units.jsonl is complete after a SIGKILL and a rerun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from spidr_fast.__main__ import main
from spidr_fast.units import KMeans, expand_runs
from spidr_fast.units_report import read_units
from tests.conftest import FIXTURE_DIR
from tests.sigkill import kill_mid_run

COMMON = ["--checkpoint", str(FIXTURE_DIR / "model.pt"), "--device", "cpu", "--no-progress", "--units", "heads"]


def extract(src: Path, out: Path, *args: object) -> int:
    return main(["extract", str(src), str(out), *COMMON, *map(str, args)])


@pytest.mark.parametrize("fmt", ["npy", "pt"])
def test_dedup_expands_back_to_the_frame_units(corpus, tmp_path, fmt):
    assert extract(corpus / "wavs", tmp_path / "frames", "--layer", "3", "--format", fmt) == 0
    assert extract(corpus / "wavs", tmp_path / "runs", "--layer", "3", "--format", fmt, "--dedup") == 0
    frames, runs = read_units(tmp_path / "frames"), read_units(tmp_path / "runs")  # runs: expanded by read_units
    assert frames.keys() == runs.keys() and len(frames) == 8
    for key, units in frames.items():
        assert np.array_equal(runs[key], units)
        if fmt == "npy":
            merged = np.load(tmp_path / "runs" / f"{key}.units.npy")
            durations = np.load(tmp_path / "runs" / f"{key}.durations.npy")
            assert durations.dtype == np.int64 and durations.sum() == units.size
            assert (merged[1:] != merged[:-1]).all() and np.array_equal(expand_runs(merged, durations), units)
            features = np.load(tmp_path / "runs" / f"{key}.layer3.npy")
            assert features.shape[0] == durations.sum()  # features stay per frame
        else:
            obj = torch.load(tmp_path / "runs" / f"{key}.pt")
            assert obj["durations"].sum().item() == units.size
    # a rerun finds the dedup outputs complete and rewrites nothing
    assert extract(corpus / "wavs", tmp_path / "runs", "--layer", "3", "--format", fmt, "--dedup") == 0


def test_units_jsonl(corpus, tmp_path, capsys):
    args = ["--units-only", "--units-layer", "3", "--units-format", "jsonl", "--dedup"]
    assert extract(corpus / "wavs", tmp_path / "out", *args) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "units.jsonl").read_text().splitlines()]
    frames = read_units(tmp_path / "out")
    assert [r["file"] for r in rows] == sorted(f"{k}.wav" for k in frames)
    for row in rows:
        assert np.array_equal(expand_runs(row["units"], row["durations"]), frames[row["file"].removesuffix(".wav")])
    assert extract(corpus / "wavs", tmp_path / "plain", "--layer", "3", "--units-format", "jsonl") == 0
    row = json.loads((tmp_path / "plain" / "units.jsonl").read_text().splitlines()[0])
    assert set(row) == {"file", "units"} and len(row["units"]) == len(frames[row["file"].removesuffix(".wav")])
    capsys.readouterr()
    assert main(["extract", str(corpus / "wavs"), str(tmp_path / "x"), *COMMON[:5], "--dedup"]) == 2
    assert "--dedup and --units-format jsonl need discrete units" in capsys.readouterr().err


def _cli(src: Path, out: Path, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "spidr_fast", "extract", str(src), str(out), *COMMON, *args]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_units_jsonl_complete_after_sigkill_and_rerun(corpus, tmp_path):
    src = tmp_path / "wavs"
    src.mkdir()
    for i in range(5):  # 40 files: long enough a run to be killed in the middle
        for wav in (corpus / "wavs").glob("*.wav"):
            (src / f"{wav.stem}_{i}.wav").symlink_to(wav)
    args = ["--layer", "3", "--units-format", "jsonl", "--dedup", "--num-workers", "1", "--max-batch-seconds", "1"]
    killed = tmp_path / "killed"
    kill_mid_run(_cli(src, killed, *args), lambda: len(list(killed.rglob("*.units.npy"))) >= 3)
    assert not (killed / "units.jsonl").exists()
    assert _cli(src, killed, *args).wait() == 0
    clean = tmp_path / "clean"
    assert _cli(src, clean, *args).wait() == 0
    assert (killed / "units.jsonl").read_text() == (clean / "units.jsonl").read_text()
    assert len((clean / "units.jsonl").read_text().splitlines()) == 40


def test_codebook_probs_are_the_heads_softmax(corpus, tmp_path, monkeypatch, capsys):
    src = corpus / "wavs"
    assert extract(src, tmp_path / "heads", "--layer", "3") == 0
    common = [a for a in COMMON if a not in ("--units", "heads")]
    assert (
        main(["extract", str(src), str(tmp_path / "probs"), *common, "--layer", "3", "--units", "codebook-probs"]) == 0
    )
    for path in sorted((tmp_path / "heads").glob("*.units.npy")):
        key = path.name.removesuffix(".units.npy")
        probs = np.load(tmp_path / "probs" / f"{key}.probs.npy")
        assert probs.dtype == np.float32 and probs.shape[1] == 16  # codebook size of the fixture
        np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
        assert np.array_equal(probs.argmax(1), np.load(path))
        assert np.array_equal(
            np.load(tmp_path / "probs" / f"{key}.layer3.npy"), np.load(tmp_path / "heads" / f"{key}.layer3.npy")
        )
    # the abx command finds them by name (fastabx stood in for: see tests/units/test_abx_cli.py)
    import types

    seen = []
    fake = types.SimpleNamespace(zerospeech_abx=lambda item, root, **kw: seen.append(kw["extension"]) or 0.0)
    monkeypatch.setitem(sys.modules, "fastabx", fake)
    (tmp_path / "x.item").write_text("#file onset offset #phone prev-phone next-phone speaker\n")
    assert main(["abx", str(tmp_path / "x.item"), str(tmp_path / "probs"), "--name", "probs"]) == 0
    assert seen == [".probs.npy"]
    capsys.readouterr()
    assert main(["extract", str(src), str(tmp_path / "x"), *common, "--units", "codebook-probs", "--dedup"]) == 2
    assert "need discrete units" in capsys.readouterr().err


def test_settings_record_dedup_and_the_kmeans_file(corpus, tmp_path, capsys):
    """A rerun into the same folder with --dedup, or with another k-means file at the same path, is refused."""
    src, out = corpus / "wavs", tmp_path / "out"
    assert extract(src, out, "--layer", "3") == 0
    capsys.readouterr()
    assert extract(src, out, "--layer", "3", "--dedup") == 2
    assert "dedup: false -> true" in capsys.readouterr().err
    features = [np.load(p) for p in sorted(out.glob("*.layer3.npy"))]
    km = tmp_path / "km.pt"
    common = [a for a in COMMON if a not in ("--units", "heads")]
    run = ["extract", str(src), str(tmp_path / "k"), *common, "--layer", "3", "--units", f"kmeans:{km}"]
    KMeans(4, iters=2, device="cpu", seed=0).fit(features).save(km)
    assert main(run) == 0
    KMeans(4, iters=2, device="cpu", seed=1).fit(features).save(km)
    capsys.readouterr()
    assert main(run) == 2
    assert "kmeans_sha256" in capsys.readouterr().err


def _torchrun(src: Path, out: Path, *args: str) -> tuple[int, str]:
    """`python -m torch.distributed.run --standalone --nproc-per-node 2 -m spidr_fast extract ...`, as production
    launches it (gloo: CPU only), in its own session, killed whole on timeout."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["-m", "spidr_fast", "extract", str(src), str(out), *COMMON, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks
        output, _ = proc.communicate()
        pytest.fail(f"2-rank extraction hung (killed after 240 s):\n{output[-3000:]}")
    return proc.returncode, output


def test_units_jsonl_merged_under_torchrun(corpus, tmp_path):
    """2 ranks: one OUTPUT_DIR/units.jsonl, the same as one process writes, no per-rank file left; resumable."""
    args = ["--layer", "3", "--units-format", "jsonl", "--dedup", "--num-workers", "1"]
    single = tmp_path / "single"
    assert extract(corpus / "wavs", single, *args) == 0
    out = tmp_path / "two"
    returncode, output = _torchrun(corpus / "wavs", out, *args)
    assert returncode == 0, output[-3000:]
    assert "rank 0/2" in output and "rank 1/2" in output  # both ranks had files
    assert sorted(p.name for p in out.glob("units*.jsonl")) == ["units.jsonl"]
    assert (out / "units.jsonl").read_text() == (single / "units.jsonl").read_text()
    assert len((out / "units.jsonl").read_text().splitlines()) == 8
    # a lost units.jsonl and a lost output: the rerun redoes that output and merges the whole corpus again
    (out / "units.jsonl").unlink()
    next(out.glob("*.units.npy")).unlink()
    returncode, output = _torchrun(corpus / "wavs", out, *args)
    assert returncode == 0, output[-3000:]
    assert (out / "units.jsonl").read_text() == (single / "units.jsonl").read_text()
    assert sorted(p.name for p in out.glob("units*.jsonl")) == ["units.jsonl"]
