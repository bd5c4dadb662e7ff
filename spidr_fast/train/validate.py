"""Validation on dev manifests: loss and perplexities, and unit quality (PNMI, purity) when alignments exist.

Every rank runs the same number of forwards (FSDP2 gathers parameters collectively, and the model
all-reduces its codebook statistics): the dev batches are split evenly across ranks by the sampler,
and units are extracted round-robin with a repeated utterance padding the last round.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from spidr_fast.config import DataConfig, MaskingConfig
from spidr_fast.data.dataset import SpeechDataset
from spidr_fast.framing import RECEPTIVE_FIELD
from spidr_fast.train.data import SkippedFiles, build_loader
from spidr_fast.train.step import autocast

if TYPE_CHECKING:
    from spidr_fast.metrics import UnitMetrics


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def extract_units(
    core: nn.Module, dataset: SpeechDataset, device: torch.device, dtype: torch.dtype
) -> dict[str, list[np.ndarray]]:
    """fileid -> one int64 unit sequence per head (argmax of each head), on rank 0 (empty elsewhere)."""
    rank, world = _dist()
    mine: dict[str, list[np.ndarray]] = {}
    for i in range(rank, math.ceil(len(dataset) / world) * world, world):
        item = dataset[min(i, len(dataset) - 1)]
        usable = item.waveform is not None
        if not usable and world == 1:
            continue
        # An unusable file (skip_bad) still costs its rank a forward, on one frame of silence whose
        # units are dropped: every rank must run as many forwards as the others (FSDP2's gathers).
        waveform = item.standardized() if usable else torch.zeros(RECEPTIVE_FIELD)
        with autocast(device, dtype):
            probs = core.get_codebooks(waveform[None].to(device))
        if usable and i < len(dataset):
            heads = [p for p in probs if p is not None]
            mine[dataset.entries[i].fileid] = [p.reshape(-1, p.shape[-1]).argmax(-1).cpu().numpy() for p in heads]
    if world == 1:
        return mine
    gathered: list[Any] = [None] * world if rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    return {k: v for part in gathered for k, v in part.items()} if rank == 0 else {}


@torch.no_grad()
def validate(
    model: nn.Module,
    core: nn.Module,
    name: str,
    cfg: DataConfig,
    masking: MaskingConfig,
    *,
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
    skipped: SkippedFiles | None = None,
) -> dict[str, float]:
    """Mean loss per masked frame and mean perplexities over the dev set `cfg` (all ranks call it).

    `skipped` (kept by the caller across validations) names each unusable dev file once per run."""
    rank, world = _dist()
    skipped = skipped or SkippedFiles(cfg.manifest, name)
    loader, sampler, dataset = build_loader(
        dataclasses.replace(cfg, rand_crop=False, num_workers=0),
        masking,
        rank=rank,
        world_size=world,
        seed=seed,
        log_skipped=False,
    )
    sampler.set_epoch(0)
    was_training = core.training
    core.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, frames, target ppl, pred ppl
    used = 0  # batches with audio (skip_bad: a batch whose files were all unusable is skipped on every rank)
    try:
        for batch in loader:
            if not skipped.usable(batch, device, skip_bad=cfg.skip_bad, world_size=world):
                continue
            used += 1
            with autocast(device, dtype):
                losses, metrics = model(batch.device_waveforms(device), mask_indices=batch.mask_indices.to(device))
            sums += torch.stack(
                [
                    losses.double().sum(),
                    torch.tensor(losses.numel(), device=device).double(),
                    metrics["target_ppl"].double(),
                    metrics["pred_ppl"].double(),
                ]
            )
        num_batches = torch.tensor([float(used)], dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(sums)
            dist.all_reduce(num_batches)
        loss_sum, frames, target_ppl, pred_ppl = sums.tolist()
        batches = max(1.0, float(num_batches))
        out = {"loss": loss_sum / max(frames, 1.0), "target_ppl": target_ppl / batches, "pred_ppl": pred_ppl / batches}
        if cfg.alignments_path:
            out |= unit_quality(core, dataset, cfg.alignments_path, device, dtype)
    finally:
        core.train(was_training)
    return out


def unit_quality(
    core: nn.Module, dataset: SpeechDataset, alignments_path: str, device: torch.device, dtype: torch.dtype
) -> dict[str, float]:
    """PNMI / phone purity / codebook perplexity of each head's units (and of the best head, by PNMI)."""
    from spidr_fast.data.corpus import read_alignments

    units = extract_units(core, dataset, device, dtype)
    return heads_quality(units, read_alignments(alignments_path))[0] if units else {}


def heads_quality(units: dict[str, list[np.ndarray]], alignments: dict) -> tuple[dict[str, float], list[UnitMetrics]]:
    """`unit_quality`'s numbers from units already extracted (`extract_units`), and each head's full metrics."""
    from spidr_fast.metrics import unit_metrics

    num_heads = len(next(iter(units.values())))
    metrics = [unit_metrics({k: v[h] for k, v in units.items()}, alignments) for h in range(num_heads)]
    out: dict[str, float] = {}
    for h, m in enumerate(metrics):
        out |= {f"head{h}_pnmi": m.pnmi, f"head{h}_phone_purity": m.phone_purity, f"head{h}_unit_ppl": m.perplexity}
    best = max(range(num_heads), key=lambda h: out[f"head{h}_pnmi"])
    out |= {"pnmi": out[f"head{best}_pnmi"], "phone_purity": out[f"head{best}_phone_purity"], "best_head": best}
    return out, metrics
