"""The per-layer compiled step: no recompilation across the batches of a bucket, and equal to eager."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from spidr_fast import SpidR
from spidr_fast.config import MaskingConfig, OptimizerConfig
from spidr_fast.data.batching import num_frames
from spidr_fast.data.masks import compute_mask_indices
from spidr_fast.train.config import read_config
from spidr_fast.train.optim import build_optimizer
from spidr_fast.train.parallelize import parallelize
from spidr_fast.train.step import StepContext, train_step

# Batches of one bucket: lengths within a few hundred samples, 2 to 4 utterances.
SHAPES = [(3, 12_800), (2, 12_480), (4, 12_960), (3, 12_650), (2, 12_800)]


def make_step(compile: bool, backend: str = "aot_eager", overrides: tuple[str, ...] = ()) -> StepContext:
    """The trainer's step (parallelize, build_optimizer) of the tiny SpidR, dropout off (compiled and eager
    runs draw different random streams)."""
    cfg = read_config("tiny", ["model.encoder_dropout=0.0", "model.encoder_attention_dropout=0.0", *overrides]).model
    torch.manual_seed(0)
    model = SpidR(cfg).train()
    called, scale = parallelize(
        model,
        parallelism="none",
        world_size=1,
        device=torch.device("cpu"),
        param_dtype=torch.float32,
        compile=compile,
        compile_backend=backend,
        compile_dynamic=True,
    )
    optimizer, scheduler = build_optimizer(model, OptimizerConfig(warmup_steps=0))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return StepContext(called, model, optimizer, scheduler, params, 10.0, torch.device("cpu"), torch.float32, scale)


def batch(step: int, size: int, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    waveforms = torch.randn(size, samples, generator=torch.Generator().manual_seed(step))
    mask = compute_mask_indices((size, int(num_frames(samples))), config=MaskingConfig(mask_length=3), rng=step)
    return waveforms, torch.from_numpy(mask)


def test_no_recompilation_within_a_bucket_and_equal_to_eager() -> None:
    torch._dynamo.reset()
    compiled, eager = make_step(compile=True), make_step(compile=False)
    losses = []
    for step, (size, samples) in enumerate(SHAPES, start=1):
        waveforms, mask = batch(step, size, samples)
        if step == 2:  # the first step compiled every graph (student train mode, teacher eval mode)
            frames_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        with torch._dynamo.config.patch(error_on_recompile=step > 1):
            got = train_step(compiled, waveforms, mask, step)["loss"]
        want = train_step(eager, waveforms, mask, step)["loss"]
        losses.append((float(got), float(want)))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames_before
    assert frames_before > 0
    for got, want in losses:
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
