"""FLOPs of one training step, counted once with `torch.utils.flop_counter.FlopCounterMode`, and MFU.

The count runs forward + backward (student) and the teacher forward on the first training batch, on a
copy of the model, before it is compiled or sharded (MFU is then 6N-style "model FLOPs", recomputation
and communication excluded).
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from spidr_fast.train.step import autocast

logger = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s by GPU name (datasheets); MFU is reported only where one is known.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12, "B200": 2250e12}


def peak_flops(device: torch.device, override: float = 0.0) -> float:
    if override > 0:
        return override
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), 0.0)


class _GlobalOnly:
    """Stands in for FlopCounterMode's module tracker, whose hooks trip on modules called under no_grad
    with inputs that require grad (the teacher); only the global total is needed."""

    parents = frozenset({"Global"})

    def __enter__(self) -> None:
        pass

    def __exit__(self, *args: object) -> None:
        pass


def count_step_flops(model: nn.Module, waveforms: Tensor, mask_indices: Tensor, dtype: torch.dtype) -> int:
    """FLOPs of forward + backward of `model` (train mode) on one batch. Runs the step for real on a
    deep copy, with the RNG forked: the caller's model, codebooks and random streams are untouched.
    Rank-local: no collective runs, whatever the process group."""
    model = copy.deepcopy(model).train()
    if hasattr(model, "codebooks"):
        # This rank's codebook statistics only: the count runs no collective, so a rank whose count fails
        # (or that counts another batch) cannot leave the others waiting in an all-reduce.
        model.codebooks.all_reduce = lambda *stats: stats
    devices = [waveforms.device] if waveforms.device.type == "cuda" else []
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()
    try:
        with torch.random.fork_rng(devices=devices), counter, autocast(waveforms.device, dtype):
            losses, _ = model(waveforms, mask_indices=mask_indices)
            losses.float().sum().backward()
    except Exception as e:  # an op FlopCounterMode cannot run: report no MFU rather than fail the run
        logger.warning("FLOP count failed (%s: %s): MFU will not be reported", type(e).__name__, e)
        return 0
    return counter.get_total_flops()
