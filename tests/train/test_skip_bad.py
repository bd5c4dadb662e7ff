"""Training on a corpus with unusable files: `data.skip_bad` skips empty batches and names each bad
file once; nothing usable (or 8 kHz audio) stops with a clear error that says what to do."""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from spidr_fast.data.batching import BucketBatchSampler
from spidr_fast.data.manifest import read_manifest, write_manifest
from spidr_fast.train import cli
from spidr_fast.train import data as train_data
from spidr_fast.train.config import read_config
from spidr_fast.train.data import NoUsableDataError, SkippedFiles
from spidr_fast.train.trainer import train
from tests.train.conftest import tiny_overrides


def _with_bad_files(corpus: Path, out: Path, bad: set[int]) -> Path:
    """A copy of the corpus manifest where the files at indices `bad` are replaced by non-audio files."""
    entries = read_manifest(corpus / "manifest.csv")
    (out / "bad").mkdir(parents=True, exist_ok=True)
    for i in bad:
        path = out / "bad" / Path(entries[i].path).name
        path.write_bytes(b"not audio" * 50)
        entries[i] = dataclasses.replace(entries[i], path=str(path))
    return write_manifest(entries, out / "manifest.csv")


def _batches_of_epoch(manifest: Path, overrides: list[str], epoch: int) -> list[list[int]]:
    cfg = read_config("tiny", overrides)
    sampler = BucketBatchSampler([e.num_samples for e in read_manifest(manifest)], cfg.data)
    return sampler.all_batches(epoch)


def test_skip_bad_skips_empty_batches_names_each_file_once(
    corpus: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = tiny_overrides(corpus, tmp_path, "data.skip_bad=true", "optimizer.max_steps=7", "run.save_interval=0")
    # Every file of epoch 1's first and third batches is bad: the FLOP count's first batch and a batch
    # inside the loop lose all their files (a conv on a (0, 0) batch crashed before).
    batches = _batches_of_epoch(corpus / "manifest.csv", base, epoch=1)
    assert len(batches) >= 4
    bad = set(batches[0]) | set(batches[2])
    manifest = _with_bad_files(corpus, tmp_path / "data", bad)
    # The same files as a dev set, one utterance per batch: some dev batches are empty too.
    dev = [f"validation.dev.{k}" for k in (f"manifest={manifest}", "skip_bad=true", "max_batch_length=64000")]
    overrides = [
        *base,
        f"data.manifest={manifest}",
        "run.save_interval=7",
        *dev,
        "validation.dev.max_sample_size=64000",
        "run.validation_interval=3",
    ]
    decided = collections.Counter()  # SkippedFiles.usable: the one place the trainer and validation decide
    usable = SkippedFiles.usable
    monkeypatch.setattr(
        SkippedFiles, "usable", lambda self, *a, **k: decided.update([self.split]) or usable(self, *a, **k)
    )
    with caplog.at_level(logging.INFO):
        train(read_config("tiny", overrides))
    assert decided["train"] >= 7 + 1 and decided["dev"] > 0
    run_dir = tmp_path / "spidr" / "tiny"
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    last = [r for r in records if r["split"] == "train"][-1]
    assert last["step"] == 7
    assert last["skipped_files"] == len(bad) and last["skipped_batches"] >= 2
    dev_records = [r for r in records if r["split"] == "dev"]  # 3 validations, each with empty batches
    assert [r["step"] for r in dev_records] == [3, 6, 7]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in dev_records)
    bad_names = [Path(read_manifest(manifest)[i].path).name for i in bad]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for name in bad_names:  # each bad file named once per split, with its reason, however many epochs read it
        assert sum(name in w and "unreadable" in w and "(train:" in w for w in warnings) == 1, name
        assert sum(name in w and "unreadable" in w and "(dev:" in w for w in warnings) == 1, name
    assert not [w for w in warnings if "(dev:" not in w and "(train:" not in w and "skipping" in w]
    assert any(f"{len(bad)} unusable file(s)" in w and "skipped" in w for w in warnings)
    # The run ends with where its final checkpoint is.
    final = run_dir / "checkpoints" / "step_7.pt"
    assert final.is_file()
    assert caplog.records[-1].getMessage() == f"final checkpoint: {final} (step 7)"


def test_only_bad_files_is_a_clear_error(corpus: Path, tmp_path: Path) -> None:
    n = len(read_manifest(corpus / "manifest.csv"))
    manifest = _with_bad_files(corpus, tmp_path / "data", set(range(n)))
    overrides = tiny_overrides(corpus, tmp_path, f"data.manifest={manifest}", "data.skip_bad=true")
    expected = rf"no usable audio in data\.manifest={re.escape(str(manifest))}.*{n} file\(s\) are unusable"
    with pytest.raises(NoUsableDataError, match=expected):
        train(read_config("tiny", overrides))


def test_8khz_manifest_error_names_the_fix(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    entries = read_manifest(corpus / "manifest.csv")
    (tmp_path / "k8").mkdir()
    for i, e in enumerate(entries):
        audio, _ = sf.read(e.path, dtype="float32")
        path = tmp_path / "k8" / Path(e.path).name
        sf.write(path, np.ascontiguousarray(audio[::2]), 8000)
        entries[i] = dataclasses.replace(e, path=str(path), num_samples=audio[::2].shape[0])
    manifest = write_manifest(entries, tmp_path / "k8.csv")
    for skip in ("false", "true"):
        overrides = tiny_overrides(corpus, tmp_path / skip, f"data.manifest={manifest}", f"data.skip_bad={skip}")
        assert cli.main(argparse.Namespace(config="tiny", overrides=overrides)) == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert "sample rate 8000 Hz" in err and "resample" in err and "16000" in err, err


def test_num_threads_is_set(corpus: Path, tmp_path: Path) -> None:
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        overrides = tiny_overrides(corpus, tmp_path, "run.num_threads=1", "optimizer.max_steps=1")
        train(read_config("tiny", overrides))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match=r"run\.num_threads"):
        read_config("tiny", ["run.num_threads=-1"])


def test_ranks_agree_on_skipping_a_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """With skip_bad and several ranks, a batch left empty on one rank is skipped on all (the all-reduce
    is faked: another rank's batch was empty); without skip_bad or with one rank, no collective runs."""
    import torch

    from spidr_fast.data.batching import Batch

    calls = []
    monkeypatch.setattr(train_data, "all_ranks", lambda flag, device: calls.append(flag) or False)
    full = Batch(torch.zeros(1, 400), torch.zeros(1, 0, dtype=torch.long), torch.tensor([400]))
    empty = Batch(torch.zeros(0, 0), torch.zeros(0, 0, dtype=torch.long), torch.zeros(0), skipped=("a.wav: bad",))
    skipped = SkippedFiles("m.csv")
    cpu = torch.device("cpu")
    assert skipped.usable(full, cpu, skip_bad=True, world_size=2) is False and calls == [True]
    assert skipped.usable(empty, cpu, skip_bad=True, world_size=2) is False and calls == [True, False]
    assert skipped.usable(full, cpu, skip_bad=False, world_size=2) is True
    assert skipped.usable(full, cpu, skip_bad=True, world_size=1) is True
    assert skipped.usable(empty, cpu, skip_bad=True, world_size=1) is False
    assert len(calls) == 2 and skipped.counts() == {"skipped_files": 1, "skipped_batches": 2}
