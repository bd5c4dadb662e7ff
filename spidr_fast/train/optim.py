"""AdamW over the trainable student parameters, and the reference's four LR schedules in closed form.

The schedules are plain functions `step -> factor of the base LR`, equal to the reference's chains of
`LinearLR`/`LambdaLR`/`CosineAnnealingLR` inside `SequentialLR` (checked in tests/train/test_optim.py),
and drive a `LambdaLR`, whose state is only `last_epoch`: resuming restores it exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from torch.optim import AdamW
from torch.optim.lr_scheduler import LambdaLR

from spidr_fast.config import OptimizerConfig


def _linear(step: int, total: int, start: float, end: float) -> float:
    return start + (end - start) * min(step, total) / total if total > 0 else end


def _warmup_start(cfg: OptimizerConfig) -> float:
    return cfg.init_lr_scale if cfg.warmup_steps > 0 else 1.0


def tristage(step: int, cfg: OptimizerConfig) -> float:
    """Linear warm-up from init_lr_scale, hold at 1, then exponential decay towards final_lr_scale."""
    if step < cfg.warmup_steps:
        return _linear(step, cfg.warmup_steps, _warmup_start(cfg), 1.0)
    if step < cfg.warmup_steps + cfg.hold_steps:
        return 1.0
    return math.exp(math.log(cfg.final_lr_scale) * (step - cfg.warmup_steps - cfg.hold_steps) / cfg.decay_steps)


def cosine(step: int, cfg: OptimizerConfig) -> float:
    """Linear warm-up, then a half cosine from 1 down to final_lr_scale at max_steps."""
    if step < cfg.warmup_steps:
        return _linear(step, cfg.warmup_steps, _warmup_start(cfg), 1.0)
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.final_lr_scale + (1 - cfg.final_lr_scale) * (1 + math.cos(math.pi * progress)) / 2


def rsqrt(step: int, cfg: OptimizerConfig) -> float:
    """Warm-up to 1/sqrt(1 + shift/ts), hold at 1 (as the reference), then 1/sqrt(1 + (t + shift)/ts)."""
    if step < cfg.warmup_steps:
        end = 1 / math.sqrt(1 + cfg.rsqrt_shift / cfg.rsqrt_timescale)
        return _linear(step, cfg.warmup_steps, _warmup_start(cfg), end)
    if step < cfg.warmup_steps + cfg.hold_steps:
        return 1.0
    t = step - cfg.warmup_steps - cfg.hold_steps
    return 1 / math.sqrt(1 + (t + cfg.rsqrt_shift) / cfg.rsqrt_timescale)


def constant(step: int, cfg: OptimizerConfig) -> float:
    """Linear warm-up, then 1."""
    if step < cfg.warmup_steps:
        return _linear(step, cfg.warmup_steps, _warmup_start(cfg), 1.0)
    return 1.0


SCHEDULES: dict[str, Callable[[int, OptimizerConfig], float]] = {
    "tristage": tristage,
    "cosine": cosine,
    "rsqrt": rsqrt,
    "constant": constant,
}


def lr_factor(cfg: OptimizerConfig) -> Callable[[int], float]:
    """The schedule of `cfg.scheduler` as `step -> factor` (a picklable partial)."""
    if cfg.scheduler not in SCHEDULES:
        raise ValueError(f"unknown scheduler {cfg.scheduler!r}; known: {', '.join(SCHEDULES)}")
    return partial(SCHEDULES[cfg.scheduler], cfg=cfg)


def trainable_parameters(model: nn.Module, cfg: OptimizerConfig) -> list[tuple[str, nn.Parameter]]:
    """Parameters the optimizer owns: not under an `exclude_from_optimizer` prefix (the teacher), requires_grad."""
    return [
        (name, p)
        for name, p in model.named_parameters()
        if p.requires_grad and not any(name.startswith(prefix) for prefix in cfg.exclude_from_optimizer)
    ]


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> tuple[AdamW, LambdaLR]:
    """AdamW (fused on CUDA) with one group over `trainable_parameters`, and its LR scheduler.

    Parameters frozen later (extractor and projection at `freeze_step`) get no gradient and AdamW
    skips them: no weight decay, no moment update, as the reference's removal of their group.
    """
    params = [p for _, p in trainable_parameters(model, cfg)]
    if not params:
        raise ValueError("no trainable parameter")
    fused = all(p.device.type == "cuda" for p in params)
    optimizer = AdamW(
        params,
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        weight_decay=cfg.weight_decay,
        eps=cfg.eps,
        fused=fused or None,
        foreach=None if fused else True,
    )
    return optimizer, LambdaLR(optimizer, lr_factor(cfg))


def grad_norm_and_clip_(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Total gradient norm (a device scalar, DTensor-aware for FSDP2), and clip to `max_norm` in place."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, foreach=True)
    if hasattr(total, "full_tensor"):  # FSDP2: DTensor norm with a pending reduction across shards
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
    return total
