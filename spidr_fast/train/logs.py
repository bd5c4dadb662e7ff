"""Rank-0 run log: JSONL lines (`train_log.jsonl`), TensorBoard when installed, and throughput windows."""

from __future__ import annotations

import json
import logging
import resource
import time
from pathlib import Path
from typing import Any

import torch

from spidr_fast.config import SAMPLE_RATE

logger = logging.getLogger(__name__)


class Throughput:
    """Audio seconds, frames and FLOPs since the last `pop`, counted on the host (no sync)."""

    def __init__(self, flops_per_audio_second: float, peak_flops: float) -> None:
        self.flops_per_audio_second, self.peak_flops = flops_per_audio_second, peak_flops
        self.samples = self.frames = 0
        self.start = time.perf_counter()

    def update(self, num_samples: int, num_frames: int) -> None:
        self.samples += num_samples
        self.frames += num_frames

    def pop(self, device: torch.device) -> dict[str, float]:
        """Rates per device since the last pop (the caller has synchronised, e.g. by reading the meters)."""
        now = time.perf_counter()
        elapsed = max(now - self.start, 1e-9)
        audio = self.samples / SAMPLE_RATE
        out = {"audio_s_per_s": audio / elapsed, "frames_per_s": self.frames / elapsed, "step_time_s": elapsed}
        if self.flops_per_audio_second > 0 and self.peak_flops > 0:
            out["mfu"] = audio * self.flops_per_audio_second / elapsed / self.peak_flops
        out["peak_mem_gib"] = peak_memory_gib(device)
        self.samples = self.frames = 0
        self.start = now
        return out


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB -> GiB (process RSS)


class RunLog:
    """Appends JSON lines to `path` and mirrors scalars to TensorBoard (rank 0 only; no-op elsewhere)."""

    def __init__(self, path: Path, *, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self.path = path
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(path.parent / "tensorboard"))
            except ImportError:
                logger.info("tensorboard is not installed: logging to %s only", path)

    def log(self, prefix: str, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"split": prefix, "step": step, "time": time.time(), **values}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, int | float):
                    self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
