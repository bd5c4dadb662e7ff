"""bench/train_throughput.py times the trainer's own step (spidr_fast.train: parallelize, build_optimizer,
train_step), not a copy of it: what the README's throughput ratios claim. Never a timing check."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import train_throughput

from spidr_fast.train import parallelize as parallelize_module
from spidr_fast.train import step as step_module


@pytest.fixture
def spies(monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """Records each call of the trainer's `train_step` and `parallelize` made through the benchmark."""
    calls: dict[str, list] = {"train_step": [], "parallelize": []}

    def spy(name: str, real):
        def wrapper(*args, **kwargs):
            calls[name].append(kwargs if name == "parallelize" else args[1:])
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(train_throughput, "train_step", spy("train_step", step_module.train_step))
    monkeypatch.setattr(train_throughput, "parallelize", spy("parallelize", parallelize_module.parallelize))
    return calls


def test_spidr_fast_is_timed_on_the_trainers_step(spies: dict[str, list]) -> None:
    device = torch.device("cpu")
    _, budget, max_len = train_throughput.PRESETS["tiny"]
    batches = train_throughput.make_batches(1, budget, max_len, 0, device)
    args = argparse.Namespace(device="cpu", config="tiny", dtype="fp32", steps=2, warmup=1, reference_mask="none")
    record = train_throughput.run("spidr_fast", False, args, batches)
    assert record["impl"] == "spidr_fast" and record["steps"] == 2 and record["audio_seconds_per_s"] > 0
    # One warm-up step and two timed ones, each the trainer's train_step on the benchmark's batch.
    assert len(spies["train_step"]) == 3
    for waveforms, mask_indices, _ in spies["train_step"]:
        assert waveforms is batches[0].waveforms and mask_indices is batches[0].mask_indices
    assert [n for *_, n in spies["train_step"]] == [0, 1, 2]
    # The model went through the trainer's transforms, once: one device, no compile in eager mode.
    [kwargs] = spies["parallelize"]
    assert kwargs["parallelism"] == "none" and kwargs["world_size"] == 1 and kwargs["compile"] is False


def test_trainer_step_returns_the_trainers_metrics() -> None:
    fields, budget, max_len = train_throughput.PRESETS["tiny"]
    [batch] = train_throughput.make_batches(1, budget, max_len, 0, torch.device("cpu"))
    step = train_throughput.trainer_step(fields, torch.device("cpu"), torch.float32, compile_model=False)
    out = step(batch, 1)
    assert set(out) == {"loss", "grad_norm", "target_ppl", "pred_ppl", "lr", "ema_decay"}
    assert math.isfinite(float(out["loss"])) and float(out["grad_norm"]) > 0
