"""Validation's unit extraction keeps ranks in step: every rank runs as many forwards as the others,
an unusable dev file (skip_bad) included (under FSDP2 each forward gathers parameters collectively)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from spidr_fast.data.dataset import Utterance
from spidr_fast.train import validate


class _Dataset:
    """Five dev files; file 1 (rank 1's first, with two ranks) is unusable."""

    def __init__(self) -> None:
        self.entries = [SimpleNamespace(fileid=f"f{i}") for i in range(5)]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> Utterance:
        if i == 1:
            return Utterance(i, 0, None, error="f1: unusable")
        if i == 3:  # a PCM16 file, as the trainer's loader gives it (int16 with its statistics)
            return Utterance(i, 0, torch.arange(800 + 320 * i, dtype=torch.int16) % 300, stats=(150.0, 0.01))
        return Utterance(i, 0, torch.randn(800 + 320 * i))


class _Core:
    def __init__(self) -> None:
        self.forwards = 0

    def get_codebooks(self, waveforms: torch.Tensor) -> list[torch.Tensor]:
        assert waveforms.dtype == torch.float32  # int16 audio is standardised first (conv1d refuses int16)
        self.forwards += 1
        frames = (waveforms.shape[-1] - 400) // 320 + 1
        return [torch.rand(1, frames, 4)]


def _run(monkeypatch: pytest.MonkeyPatch, rank: int, world: int) -> tuple[int, dict[str, list[np.ndarray]]]:
    core = _Core()
    monkeypatch.setattr(validate, "_dist", lambda: (rank, world))

    def gather_object(mine: dict, gathered: list | None, dst: int) -> None:  # rank 0's share, the others' empty
        if gathered is not None:
            gathered[:] = [mine] + [{}] * (len(gathered) - 1)

    monkeypatch.setattr(validate.dist, "gather_object", gather_object)
    units = validate.extract_units(core, _Dataset(), torch.device("cpu"), torch.float32)
    return core.forwards, units


def test_every_rank_runs_as_many_forwards_with_an_unusable_file(monkeypatch: pytest.MonkeyPatch) -> None:
    (forwards0, units0), (forwards1, _) = _run(monkeypatch, 0, 2), _run(monkeypatch, 1, 2)
    assert forwards0 == forwards1 == 3  # files 0, 2, 4 on rank 0; 1 (unusable), 3, and 4 again on rank 1
    assert set(units0) == {"f0", "f2", "f4"}  # rank 0's own share (the gather is faked)


def test_one_process_skips_an_unusable_file(monkeypatch: pytest.MonkeyPatch) -> None:
    forwards, units = _run(monkeypatch, 0, 1)
    assert forwards == 4 and set(units) == {"f0", "f2", "f3", "f4"}
