"""Training checkpoints: atomic, every N steps, keep-latest-K, exact resume.

A checkpoint holds the model (the reference's state-dict keys: the file's "model" entry loads with
`spidr_fast.load_model` and the reference), the optimizer (keyed by parameter name), the LR
scheduler, the train state (step, epoch, batch within the epoch) and every rank's RNG states
(python, numpy, torch CPU and CUDA), so that a resumed run draws what the uninterrupted one drew.

Formats (`run.checkpoint_format`):
- "full": `step_{N}.pt`, gathered on rank 0 (FSDP2 shards are all-gathered) and written to a temp
  file then renamed: a crash mid-write leaves the previous checkpoints intact.
- "sharded": a `torch.distributed.checkpoint` folder `step_{N}/` written by all ranks into a temp
  folder, renamed by rank 0 once every rank is done.
Checkpoints live in `RUN_DIR/checkpoints/`; only complete ones (renamed) are ever found.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from spidr_fast.io import atomic_write

logger = logging.getLogger(__name__)
PREFIX = "step_"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _is_dist() else 0


def _barrier() -> None:
    if _is_dist():
        dist.barrier()


def _gather_rng() -> list[dict[str, Any]]:
    if not _is_dist():
        return [rng_state()]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, rng_state())
    return states


def step_of(path: Path) -> int:
    return int(path.name.removeprefix(PREFIX).removesuffix(".pt"))


def find_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints (`step_N.pt` files and `step_N/` folders) by step."""
    if not folder.is_dir():
        return []
    found = [
        p
        for p in folder.iterdir()
        if p.name.startswith(PREFIX) and p.name.removeprefix(PREFIX).split(".")[0].isdigit()
    ]
    return sorted(found, key=step_of)


def _options(full: bool) -> StateDictOptions:
    return StateDictOptions(full_state_dict=full, cpu_offload=full and _is_dist())


class Checkpointer:
    """Saves and restores {model, optimizer, scheduler, train state, RNG} in `folder`."""

    def __init__(self, folder: Path, *, interval: int, keep_latest: int = -1, fmt: str = "full") -> None:
        if fmt not in ("full", "sharded"):
            raise ValueError(f"checkpoint_format must be 'full' or 'sharded', got {fmt!r}")
        self.folder, self.interval, self.keep_latest, self.fmt = Path(folder), interval, keep_latest, fmt

    def due(self, step: int) -> bool:
        return self.interval > 0 and step % self.interval == 0

    def latest(self) -> Path | None:
        found = find_checkpoints(self.folder)
        return found[-1] if found else None

    def save(
        self, step: int, model: nn.Module, optimizer: Optimizer, scheduler: LRScheduler, train_state: dict[str, Any]
    ) -> Path:
        """Collective: every rank calls it. Returns the checkpoint's path."""
        msd, osd = get_state_dict(model, optimizer, options=_options(self.fmt == "full"))
        extra = {
            "scheduler": scheduler.state_dict(),
            "train_state": dict(train_state),
            "rng": _gather_rng(),
            "step": torch.tensor([step], dtype=torch.int64),
            "epoch": torch.tensor([train_state["epoch"]], dtype=torch.int64),
        }
        path = self.folder / f"{PREFIX}{step}{'.pt' if self.fmt == 'full' else ''}"
        if _rank() == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
        if self.fmt == "full":
            if _rank() == 0:
                atomic_write(path, lambda tmp: torch.save({"model": msd, "optimizer": osd, **extra}, tmp))
        else:
            self._save_sharded(path, {"model": msd, "optimizer": osd}, extra)
        _barrier()
        if _rank() == 0:
            self._purge()
        _barrier()
        return path

    def _save_sharded(self, path: Path, state: dict[str, Any], extra: dict[str, Any]) -> None:
        import torch.distributed.checkpoint as dcp

        tmp = path.with_name(f".{path.name}.tmp")
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        dcp.save(state, checkpoint_id=str(tmp))
        if _rank() == 0:
            torch.save(extra, tmp / "extra.pt")
            _barrier()
            shutil.rmtree(path, ignore_errors=True)
            tmp.rename(path)  # atomic: the folder appears complete or not at all
        else:
            _barrier()

    def _purge(self) -> None:
        if self.keep_latest <= 0:
            return
        for old in find_checkpoints(self.folder)[: -self.keep_latest]:
            logger.info("deleting old checkpoint %s", old)
            shutil.rmtree(old) if old.is_dir() else old.unlink()

    def load(self, path: Path, model: nn.Module, optimizer: Optimizer, scheduler: LRScheduler) -> dict[str, Any]:
        """Restore everything in place (collective); returns the train state. This rank's RNG is restored
        when the world size matches the saving run's."""
        if path.is_dir():
            import torch.distributed.checkpoint as dcp

            msd, osd = get_state_dict(model, optimizer, options=_options(False))
            state = {"model": msd, "optimizer": osd}
            dcp.load(state, checkpoint_id=str(path))
            extra = torch.load(path / "extra.pt", map_location="cpu", weights_only=False)
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        else:
            extra = torch.load(path, map_location="cpu", weights_only=False)
            set_state_dict(
                model,
                optimizer,
                model_state_dict=extra.pop("model"),
                optim_state_dict=extra.pop("optimizer"),
                options=StateDictOptions(full_state_dict=True),
            )
        scheduler.load_state_dict(extra["scheduler"])
        rngs = extra["rng"]
        world = dist.get_world_size() if _is_dist() else 1
        if len(rngs) == world:
            set_rng_state(rngs[_rank()])
        else:
            logger.warning(
                "checkpoint saved by %d ranks, resuming on %d: RNG streams are not restored", len(rngs), world
            )
        logger.info("resumed from %s (step %d)", path, extra["train_state"]["step"])
        return extra["train_state"]


def read_model_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The model state dict of any checkpoint (training `.pt`, sharded folder, or released file), and
    the training config saved beside it (None if absent)."""
    from spidr_fast.checkpoint import state_dict_from_checkpoint

    path = Path(path)
    if path.is_dir():
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        tmp = path.with_name(f".{path.name}.export.pt")
        try:
            dcp_to_torch_save(path, tmp)
            obj = torch.load(tmp, map_location="cpu", weights_only=False)
        finally:
            tmp.unlink(missing_ok=True)
    else:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    state = state_dict_from_checkpoint(obj, str(path))
    cfg_path = path.parent.parent / "train_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else None
    return state, cfg
