"""Two processes (gloo; FSDP2 or DDP) give the losses and weights of one process on the same global batch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from spidr_fast import SpidR
from spidr_fast.data.batching import num_frames
from spidr_fast.data.masks import MaskingConfig, compute_mask_indices
from spidr_fast.train.config import OptimizerConfig, read_config
from spidr_fast.train.optim import build_optimizer
from spidr_fast.train.parallelize import parallelize, rewrap_after_freeze
from spidr_fast.train.step import StepContext, train_step

STEPS, BATCH, SAMPLES = 5, 4, 12_000


def tiny_model() -> SpidR:
    # No dropout: ranks draw different random streams. freeze_step=3 exercises the extractor freeze.
    cfg = read_config(
        "tiny", ["model.encoder_dropout=0.0", "model.encoder_attention_dropout=0.0", "model.freeze_step=3"]
    ).model
    torch.manual_seed(0)
    return SpidR(cfg).train()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    waveforms = torch.randn(BATCH, SAMPLES, generator=torch.Generator().manual_seed(step))
    mask = compute_mask_indices((BATCH, int(num_frames(SAMPLES))), config=MaskingConfig(mask_length=3), rng=step)
    return waveforms, torch.from_numpy(mask)


def run_steps(parallelism: str, rank: int, world: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    model = tiny_model()
    called, scale = parallelize(
        model,
        parallelism=parallelism,
        world_size=world,
        device=torch.device("cpu"),
        param_dtype=torch.float32,
        compile=False,
    )
    opt_cfg = OptimizerConfig(lr=1e-3, warmup_steps=2, hold_steps=2, decay_steps=4, max_steps=STEPS)
    optimizer, scheduler = build_optimizer(model, opt_cfg)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    ctx = StepContext(called, model, optimizer, scheduler, params, 10.0, torch.device("cpu"), torch.float32, scale)
    losses = []
    for step in range(1, STEPS + 1):
        waveforms, mask = batch(step)
        rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        loss = train_step(ctx, waveforms[rows], mask[rows], step)["loss"]
        if step == model.cfg.freeze_step:
            ctx.model = rewrap_after_freeze(ctx.model, model, torch.device("cpu"))
        if world > 1:
            dist.all_reduce(loss)
        losses.append(float(loss))
    options = StateDictOptions(full_state_dict=True, cpu_offload=world > 1)
    return losses, get_model_state_dict(model, options=options)


def _worker(rank: int, world: int, init_file: str, out: str, parallelism: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = run_steps(parallelism, rank, world)
        if rank == 0:
            torch.save(result, out)
        # Tear down together: a rank destroying its gloo group while the other still holds the
        # connection aborted it now and then ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("parallelism", ["fsdp", "ddp"])
def test_two_processes_equal_one(parallelism: str, tmp_path: Path) -> None:
    ref_losses, ref_state = run_steps("none", 0, 1)
    out = tmp_path / "result.pt"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(out), parallelism), nprocs=2, join=True)
    losses, state = torch.load(out, weights_only=False)
    assert losses == pytest.approx(ref_losses, abs=1e-5, rel=1e-5)
    assert state.keys() == ref_state.keys()
    for key in ref_state:
        torch.testing.assert_close(state[key], ref_state[key], atol=1e-5, rtol=1e-5, msg=key)
    # The teacher moved by EMA, and the extractor froze at step 3 (its last two updates skipped).
    assert not torch.equal(
        ref_state["teacher.layers.0.attention.qkv.weight"],
        tiny_model().state_dict()["teacher.layers.0.attention.qkv.weight"],
    )
