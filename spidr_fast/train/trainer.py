"""`train(cfg)`: pretrain SpidR/DinoSR. Reads top to bottom: setup, resume, loop, final save.

Launch with `spidr-fast train CONFIG.toml [key=value ...]` (one process) or
`torchrun --nproc-per-node N -m spidr_fast.train CONFIG.toml [key=value ...]`.
The run folder (`run.workdir/run.wandb_project/run.wandb_name`) holds `train_config.json` (the resolved
config), `train_log.jsonl`, `tensorboard/` and `checkpoints/step_N.pt`; rerunning the same command
resumes from the latest checkpoint.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import torch
from tqdm import tqdm

from spidr_fast.checkpoint import build_model, load_state_dict_strict, state_dict_from_checkpoint
from spidr_fast.config import DTYPES, SAMPLE_RATE, TrainConfig
from spidr_fast.data.batching import num_frames
from spidr_fast.train.checkpoint import Checkpointer, step_of
from spidr_fast.train.config import save_resolved
from spidr_fast.train.data import SkippedFiles, build_loader, first_usable_batch
from spidr_fast.train.env import close_env, init_env, seed_everything, setup_torch
from spidr_fast.train.flops import count_step_flops, peak_flops
from spidr_fast.train.logs import RunLog, Throughput
from spidr_fast.train.optim import build_optimizer
from spidr_fast.train.parallelize import parallelize, rewrap_after_freeze
from spidr_fast.train.step import Meters, StepContext, train_step
from spidr_fast.train.validate import validate

logger = logging.getLogger(__name__)


def train(cfg: TrainConfig, *, progress: Callable[..., Any] = tqdm) -> dict[str, Any]:
    """Run (or resume) the training of `cfg`; returns the last logged train metrics.

    `progress`: the step progress bar, called as tqdm is (`total`, `initial`, `disable`, `desc`) and
    used as a context manager with `update()` and `set_postfix(**metrics)`.
    """
    with ExitStack() as stack:
        # ---- setup: process group, seeds, run folder
        env = init_env(cfg.run.device)
        stack.push(lambda exc_type, *_: close_env(synchronize=exc_type is None))  # no barrier after an error
        setup_torch(deterministic=cfg.run.use_deterministic, num_threads=cfg.run.num_threads)
        seed_everything(cfg.run.random_seed)  # the same on every rank: one initial model, codebooks included
        run_dir, dtype, max_steps = cfg.run.dir, DTYPES[cfg.optimizer.dtype], cfg.optimizer.max_steps
        if env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_resolved(cfg, run_dir)

        # ---- model, data, FLOP count (on the first batch, before any transform)
        model = build_model(cfg.model)
        if cfg.run.init_ckpt:
            obj = torch.load(cfg.run.init_ckpt, map_location="cpu", weights_only=True)
            load_state_dict_strict(model, state_dict_from_checkpoint(obj, cfg.run.init_ckpt), cfg.run.init_ckpt)
        model.to(env.device).train()
        seed_everything(cfg.run.random_seed + env.rank)  # per-rank random streams from here on (dropout)
        loader, sampler, dataset = build_loader(
            cfg.data,
            cfg.masking,
            rank=env.rank,
            world_size=env.world_size,
            seed=cfg.run.random_seed,
            log_skipped=False,
        )
        skipped = SkippedFiles(cfg.data.manifest)  # data.skip_bad: bad files named once, empty batches skipped
        dev_skipped = {name: SkippedFiles(dev.manifest, name) for name, dev in cfg.validation.items()}
        sampler.set_epoch(1)
        first = first_usable_batch(loader, sampler, dataset, skipped)
        flops = count_step_flops(model, first.device_waveforms(env.device), first.mask_indices.to(env.device), dtype)
        flops_per_audio_second = flops / (first.waveforms.numel() / SAMPLE_RATE)

        # ---- transforms (regional compile -> FSDP2 / DDP), optimizer, resume
        called, grad_scale = parallelize(
            model,
            parallelism=cfg.run.parallelism,
            world_size=env.world_size,
            device=env.device,
            param_dtype=dtype,
            compile=cfg.run.compile,
            compile_backend=cfg.run.compile_backend,
            compile_dynamic=cfg.run.compile_dynamic,
            compile_glue=cfg.run.compile_glue,
        )
        optimizer, scheduler = build_optimizer(model, cfg.optimizer)
        ckpt = Checkpointer(
            run_dir / "checkpoints",
            interval=cfg.run.save_interval,
            keep_latest=cfg.run.keep_latest,
            fmt=cfg.run.checkpoint_format,
        )
        state: dict[str, int] = {"step": 0, "epoch": 1, "batch_in_epoch": 0}
        if (latest := ckpt.latest()) is not None:
            state = ckpt.load(latest, model, optimizer, scheduler)
            if state["step"] >= cfg.model.freeze_step:
                model.freeze_extractor()
        params = [p for group in optimizer.param_groups for p in group["params"]]
        ctx = StepContext(
            called,
            model,
            optimizer,
            scheduler,
            params,
            cfg.optimizer.max_norm,
            env.device,
            dtype,
            grad_scale,
            seed=cfg.run.random_seed,
        )

        # ---- logging
        meters, tput = (
            Meters(env.device),
            Throughput(flops_per_audio_second, peak_flops(env.device, cfg.run.flops_per_device)),
        )
        log = RunLog(run_dir / "train_log.jsonl", enabled=env.is_main, tensorboard=cfg.run.tensorboard)
        stack.callback(log.close)
        pbar = stack.enter_context(
            progress(total=max_steps, initial=state["step"], disable=not env.is_main, desc="train")
        )
        if env.is_main:
            logger.info(
                "run folder %s, %d rank(s), %.4g GFLOP per audio second",
                run_dir,
                env.world_size,
                flops_per_audio_second / 1e9,
            )
        last: dict[str, Any] = {}
        start, val_interval = time.monotonic(), cfg.run.validation_interval or cfg.run.save_interval

        # ---- loop
        while state["step"] < max_steps:
            sampler.set_epoch(state["epoch"], start=state["batch_in_epoch"])
            stop, whole_epoch, steps_in_epoch = False, state["batch_in_epoch"] == 0, 0
            for batch in loader:
                if not skipped.usable(batch, env.device, skip_bad=cfg.data.skip_bad, world_size=env.world_size):
                    state["batch_in_epoch"] += 1
                    continue
                step, steps_in_epoch = state["step"] + 1, steps_in_epoch + 1
                out = train_step(ctx, batch.device_waveforms(env.device), batch.mask_indices, step)
                state["step"], state["batch_in_epoch"] = step, state["batch_in_epoch"] + 1
                meters.update(out, step)
                tput.update(
                    batch.waveforms.numel(), batch.waveforms.shape[0] * int(num_frames(batch.waveforms.shape[-1]))
                )
                if step == cfg.model.freeze_step:
                    ctx.model = rewrap_after_freeze(ctx.model, model, env.device)
                pbar.update()
                stop = step >= max_steps or (cfg.run.max_time_s > 0 and time.monotonic() - start > cfg.run.max_time_s)
                if step % cfg.run.log_interval == 0 or stop:
                    last = (
                        meters.pop()
                        | tput.pop(env.device)
                        | {"lr": out["lr"], "ema_decay": out["ema_decay"], "epoch": state["epoch"]}
                        | (skipped.counts() if cfg.data.skip_bad else {})
                    )
                    log.log("train", step, last)
                    pbar.set_postfix(
                        loss=f"{last['loss']:.3f}",
                        target_ppl=f"{last['target_ppl']:.1f}",
                        pred_ppl=f"{last['pred_ppl']:.1f}",
                    )
                if ckpt.due(step) or (stop and cfg.run.save_interval > 0):
                    meters.check_finite()  # never save weights that went non-finite
                    ckpt.save(step, model, optimizer, scheduler, state)
                if cfg.validation and val_interval > 0 and (step % val_interval == 0 or stop):
                    for name, dev_cfg in cfg.validation.items():
                        metrics = validate(
                            called,
                            model,
                            name,
                            dev_cfg,
                            cfg.masking,
                            device=env.device,
                            dtype=dtype,
                            seed=cfg.run.random_seed,
                            skipped=dev_skipped[name],
                        )
                        log.log(name, step, metrics)
                if stop:
                    break
            else:
                if state["batch_in_epoch"] == 0:
                    raise RuntimeError(
                        f"epoch {state['epoch']} yields no batch on rank {env.rank}: check data.manifest"
                    )
                if whole_epoch and steps_in_epoch == 0:
                    shared = f" (on {env.world_size} ranks, a batch is skipped when any rank's is)" * (
                        env.world_size > 1
                    )
                    raise skipped.nothing_usable(f"every batch of epoch {state['epoch']} was empty{shared}")
                state["epoch"], state["batch_in_epoch"] = state["epoch"] + 1, 0
                continue
            break
        meters.check_finite()
        final = ckpt.latest() if env.is_main else None
    if skipped.files or skipped.batches:
        logger.warning("%s", skipped.summary())
    if final is not None:
        logger.info("final checkpoint: %s (step %d)", final, step_of(final))
    elif env.is_main:
        logger.info("no checkpoint saved (run.save_interval=%d)", cfg.run.save_interval)
    return last
