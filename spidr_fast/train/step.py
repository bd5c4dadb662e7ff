"""One optimizer step, and the on-device meters that keep its metrics until a log interval.

Nothing here reads a device value on the host: the loss, grad norm, perplexities and the
non-finite flag stay tensors; `Meters.pop` (at log intervals) is the only synchronisation.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from spidr_fast.train.optim import grad_norm_and_clip_


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm stopped being finite; the message names the first such step."""


@dataclass
class StepContext:
    """What `train_step` needs besides the batch: the (wrapped) model, its unwrapped core, optimisation."""

    model: nn.Module  # what is called: the FSDP2-sharded model, a DDP wrapper, or the plain model
    core: nn.Module  # the SpidR/DinoSR module itself (update_ema)
    optimizer: Optimizer
    scheduler: LRScheduler
    params: list[Tensor]  # the optimizer's parameters, for clipping
    max_norm: float
    device: torch.device
    dtype: torch.dtype  # autocast dtype; float32 disables autocast
    grad_scale: float  # world size when the gradient reduction averages over ranks (FSDP, DDP), else 1
    seed: int = 0  # run.random_seed: layer drop is drawn from (seed, step), the same on every rank


def layer_drop_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator step `step` draws layer drop from: a function of (seed, step) only, so every rank
    drops the same layers and a resumed run drops what the uninterrupted one dropped."""
    return torch.Generator().manual_seed((seed % 2**31) << 32 | (step % 2**32))


def global_count(n: int, device: torch.device) -> tuple[Tensor, dist.Work | None]:
    """The number `n` summed over ranks, as a float32 device scalar (an async all-reduce: wait on the Work)."""
    count = torch.full((), float(n), dtype=torch.float32, device=device)
    if dist.is_available() and dist.is_initialized():
        return count, dist.all_reduce(count, async_op=True)
    return count, None


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def train_step(
    ctx: StepContext,
    waveforms: Tensor,
    mask_indices: Tensor,
    step: int,
) -> dict[str, Tensor | float]:
    """Forward, backward, clip, optimizer + LR step, teacher EMA. `step` is the step number after this one.

    `waveforms`: float32 (B, T) standardised, moved to the device if not there yet. A `Batch` gives them
    with `batch.device_waveforms(device)` (the one place an int16 batch of PCM16 audio is standardised).

    The loss is the sum of the per-frame losses over the global number of masked frames (an all-reduce
    of the count, overlapped with the forward), times the world size when gradients are averaged: the
    gradient is then that of the global mean whatever the number of ranks.
    """
    if not waveforms.is_floating_point():
        raise ValueError(
            f"train_step: waveforms are {waveforms.dtype}, not standardised float32 "
            "(pass an int16 batch as batch.device_waveforms(device))"
        )
    waveforms = waveforms.to(ctx.device, non_blocking=True)
    mask_indices = mask_indices.to(ctx.device, non_blocking=True)
    num_masked, work = global_count(mask_indices.numel(), ctx.device)
    ctx.core.student.layer_drop_generator = layer_drop_generator(ctx.seed, step)
    with autocast(ctx.device, ctx.dtype):
        losses, metrics = ctx.model(waveforms, mask_indices=mask_indices)
    if work is not None:
        work.wait()
    loss_sum = losses.float().sum()
    (loss_sum * (ctx.grad_scale / num_masked)).backward()
    for p in ctx.core.parameters_unreached_by_the_loss():  # what eager autograd leaves None (compiled: zeros)
        p.grad = None
    grad_norm = grad_norm_and_clip_(ctx.params, ctx.max_norm)
    ctx.optimizer.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    lr = ctx.scheduler.get_last_lr()[0]  # the LR this step used (host float, no sync)
    ctx.scheduler.step()
    ema_decay = ctx.core.update_ema(step)
    loss = (loss_sum / num_masked).detach()  # this rank's share of the global mean loss
    return {
        "loss": loss,
        "grad_norm": grad_norm.detach().float(),
        "target_ppl": metrics["target_ppl"].detach().float(),
        "pred_ppl": metrics["pred_ppl"].detach().float(),
        "lr": lr,
        "ema_decay": ema_decay,
    }


class Meters:
    """Sums of step metrics on the device, and the first non-finite step, read only by `pop`.

    `loss` is summed over ranks (each rank holds its share of the global mean); the rest are equal on
    every rank (computed from all-reduced statistics) and averaged over steps.
    """

    KEYS = ("loss", "grad_norm", "target_ppl", "pred_ppl")

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sums = torch.zeros(len(self.KEYS), dtype=torch.float64, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.steps = 0

    def update(self, out: dict[str, Tensor | float], step: int) -> None:
        values = torch.stack([out[k] for k in self.KEYS]).double()  # type: ignore[misc]
        bad = ~torch.isfinite(values[:2]).all()
        self.first_bad = torch.where(bad & (self.first_bad < 0), step, self.first_bad)
        self.sums += values
        self.steps += 1

    def check_finite(self) -> None:
        """Raise `NonFiniteLossError` naming the first step whose loss or grad norm was not finite (a sync)."""
        first_bad = int(self.first_bad)
        if first_bad >= 0:
            raise NonFiniteLossError(
                f"loss or gradient norm is not finite at step {first_bad}: stopping (no checkpoint saved after it)"
            )

    def pop(self) -> dict[str, float]:
        """Means since the last pop (one all-reduce for the loss); raises on a non-finite step."""
        self.check_finite()
        sums = self.sums.clone()
        if dist.is_available() and dist.is_initialized():
            loss = sums[:1].clone()
            dist.all_reduce(loss)
            sums[0] = loss[0]
        values = (sums / max(1, self.steps)).tolist()
        self.sums.zero_()
        self.steps = 0
        return dict(zip(self.KEYS, values))
