"""A loss that stops being finite ends the run with the step named, and no checkpoint is saved after it."""

from __future__ import annotations

from pathlib import Path

import pytest

from spidr_fast.train.config import read_config
from spidr_fast.train.step import NonFiniteLossError
from spidr_fast.train.trainer import train
from tests.train.conftest import tiny_overrides


def test_non_finite_loss_stops_with_step_named(corpus: Path, tmp_path: Path) -> None:
    overrides = tiny_overrides(
        corpus,
        tmp_path,
        "optimizer.lr=1e30",
        "optimizer.warmup_steps=0",
        "optimizer.max_steps=8",
        "optimizer.max_norm=1e38",
        "run.log_interval=4",
        "run.save_interval=4",
    )
    with pytest.raises(NonFiniteLossError, match=r"not finite at step 2\b"):
        train(read_config("tiny", overrides))
    assert not list((tmp_path / "spidr" / "tiny" / "checkpoints").glob("step_*"))
