"""Two processes (gloo; FSDP2 or DDP) give the losses and weights of one process on the same global batch,
and the trainer launched by torchrun keeps one model on every rank (equal params and buffers, no hang)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from spidr_fast import SpidR
from spidr_fast.config import MaskingConfig, OptimizerConfig
from spidr_fast.data.batching import num_frames
from spidr_fast.data.masks import compute_mask_indices
from spidr_fast.train.config import read_config
from spidr_fast.train.flops import count_step_flops
from spidr_fast.train.optim import build_optimizer
from spidr_fast.train.parallelize import parallelize, rewrap_after_freeze
from spidr_fast.train.step import StepContext, train_step
from tests.train.conftest import SUBPROCESS_ENV, tiny_overrides

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


def run_steps(
    parallelism: str, rank: int, world: int, compile: bool = False
) -> tuple[list[float], dict[str, torch.Tensor]]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    model = tiny_model()
    called, scale = parallelize(
        model,
        parallelism=parallelism,
        world_size=world,
        device=torch.device("cpu"),
        param_dtype=torch.float32,
        compile=compile,
        compile_backend="aot_eager",  # the trainer's graphs (every region, fwd + bwd) without code generation
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


def _worker(rank: int, world: int, init_file: str, out: str, parallelism: str, compile: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = run_steps(parallelism, rank, world, compile)
        if rank == 0:
            torch.save(result, out)
        # Tear down together: a rank destroying its gloo group while the other still holds the
        # connection aborted it now and then ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("parallelism", "compile"), [("fsdp", False), ("ddp", False), ("fsdp", True)])
def test_two_processes_equal_one(parallelism: str, compile: bool, tmp_path: Path) -> None:
    """compile: FSDP2 around the trainer's compiled regions (layers and glue), against the eager process."""
    ref_losses, ref_state = run_steps("none", 0, 1)
    out = tmp_path / "result.pt"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(out), parallelism, compile), nprocs=2, join=True)
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


# ---------------------------------------------------------------- the trainer itself, through torchrun
# Each rank dumps its model state (FSDP2 shards gathered) right after build_model, after parallelize
# (step 0) and at every checkpoint: the trainer runs unmodified, seeded as it seeds itself.
DUMP_HOOK = """
import os
if os.environ.get("RANK") is not None:
    import torch
    from torch.distributed.tensor import DTensor
    import spidr_fast.train.trainer as trainer

    out, rank = os.environ["SPIDR_FAST_TEST_DUMP"], os.environ["RANK"]

    def dump(model, name):
        state = model.state_dict()
        state = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in state.items()}
        torch.save(state, f"{out}/{name}_rank{rank}.pt")

    build, parallelize, save = trainer.build_model, trainer.parallelize, trainer.Checkpointer.save

    def build_model(*args, **kwargs):
        model = build(*args, **kwargs)
        dump(model, "built")
        return model

    def parallelize_(model, **kwargs):
        result = parallelize(model, **kwargs)
        dump(model, "step0")
        return result

    def save_(self, step, model, *args, **kwargs):
        path = save(self, step, model, *args, **kwargs)
        dump(model, f"step{step}")
        return path

    trainer.build_model, trainer.parallelize, trainer.Checkpointer.save = build_model, parallelize_, save_
"""


def run_torchrun(overrides: list[str], hook_dir: Path, timeout: float) -> tuple[int, str]:
    """`torchrun --nproc-per-node 2 -m spidr_fast.train tiny ...` in its own session, killed whole on timeout."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["-m", "spidr_fast.train", "tiny", *overrides]
    pythonpath = os.pathsep.join(filter(None, [str(hook_dir), os.environ.get("PYTHONPATH")]))
    env = {**SUBPROCESS_ENV, "PYTHONPATH": pythonpath, "SPIDR_FAST_TEST_DUMP": str(hook_dir)}
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks
        output, _ = proc.communicate()
        pytest.fail(f"2-rank training hung (killed after {timeout:.0f} s):\n{output[-3000:]}")
    return proc.returncode, output


@pytest.mark.parametrize(("parallelism", "compile"), [("fsdp", False), ("ddp", False), ("fsdp", True)])
def test_trainer_ranks_hold_one_model(parallelism: str, compile: bool, corpus: Path, tmp_path: Path) -> None:
    # Layer drop 0.5 over 2 layers: ranks drawing their own drops (as before) skip different layers at the
    # first steps, which desynchronises FSDP2's collectives; seeds of seed + rank built different codebooks.
    # compile: the trainer's compiled regions (inductor) under FSDP2, as a GPU run has them.
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(DUMP_HOOK)
    overrides = tiny_overrides(
        corpus,
        tmp_path / "runs",
        f"run.parallelism={parallelism}",
        "run.device=cpu",  # gloo ranks, also on a machine with one GPU
        "model.encoder_layer_drop=0.5",
        "optimizer.max_steps=4",
        "run.save_interval=2",
        f"run.compile={str(compile).lower()}",
        "run.compile_backend=inductor",
    )
    returncode, output = run_torchrun(overrides, hook_dir, timeout=240)
    assert returncode == 0, output[-3000:]
    for name in ("built", "step0", "step2", "step4"):
        rank0, rank1 = (torch.load(hook_dir / f"{name}_rank{r}.pt") for r in (0, 1))
        assert rank0.keys() == rank1.keys()
        different = [key for key in rank0 if not torch.equal(rank0[key], rank1[key])]
        assert not different, f"{name}: ranks differ in {different}"
    # The model trained: the codebooks moved.
    start, end = (torch.load(hook_dir / f"{name}_rank0.pt") for name in ("step0", "step4"))
    assert any(not torch.equal(start[k], end[k]) for k in start if "codebook" in k)


def test_layer_drop_is_drawn_from_seed_and_step_alone() -> None:
    """Two 'ranks' (different global RNG streams) drop the same layers at every step; the draws vary by step."""
    cfg = read_config("tiny", ["model.encoder_layer_drop=0.5", "model.encoder_num_layers=4"]).model

    def dropped_layers(global_seed: int, steps: range) -> list[tuple[int, ...]]:
        torch.manual_seed(0)
        model = SpidR(cfg).train()
        draws: list[bool] = []
        draw = model.student._drop_layer
        model.student._drop_layer = lambda: draws.append(draw()) or draws[-1]
        optimizer, scheduler = build_optimizer(model, OptimizerConfig(lr=1e-4, max_steps=10))
        params = [p for g in optimizer.param_groups for p in g["params"]]
        ctx = StepContext(model, model, optimizer, scheduler, params, 10.0, torch.device("cpu"), torch.float32, 1.0, 7)
        torch.manual_seed(global_seed)  # what differs between ranks
        pattern = []
        for step in steps:
            draws.clear()
            train_step(ctx, *batch(step), step)
            pattern.append(tuple(i for i, dropped in enumerate(draws) if dropped))
        return pattern

    rank0, rank1 = dropped_layers(0, range(1, 7)), dropped_layers(1, range(1, 7))
    assert rank0 == rank1
    assert len(set(rank0)) > 1 and any(rank0)  # layers are dropped, not the same ones at every step
    assert dropped_layers(5, range(4, 7)) == rank0[3:]  # a resumed run drops what the uninterrupted one did


def _fail(*_: object) -> None:
    raise RuntimeError("an op the FLOP counter cannot run")


def _flops_worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        model = tiny_model()
        if rank == 1:  # this rank's count fails before its forward reaches the codebook statistics
            model.feature_extractor.register_forward_pre_hook(_fail)
        waveforms, mask = batch(1)
        flops = count_step_flops(model, waveforms[:2], mask[:2], torch.float32)
        after = torch.arange(3.0)
        dist.all_reduce(after)  # the ranks' next collective still pairs up
        torch.save((flops, after), f"{out}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_a_rank_local_flop_count_failure_keeps_ranks_in_step(tmp_path: Path) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = str(tmp_path / "flops")
    mp.spawn(_flops_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    (flops0, after0), (flops1, after1) = (torch.load(f"{out}.{rank}") for rank in (0, 1))
    assert flops0 > 0 and flops1 == 0  # rank 1 reports no MFU; rank 0 counted without waiting for it
    assert torch.equal(after0, torch.tensor([0.0, 2.0, 4.0])) and torch.equal(after1, after0)
