"""Process setup: distributed init (torchrun's environment), device, seeds, numerics flags."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Env:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_env(device: str = "auto") -> Env:
    """Read torchrun's RANK/LOCAL_RANK/WORLD_SIZE (absent: one process) and init the process group
    (NCCL on GPUs, gloo on CPU) when there is more than one process."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return Env(rank, local_rank, world_size, dev)


def close_env(synchronize: bool = False) -> None:
    """Destroy the process group; with `synchronize` (a clean finish) after a barrier, so ranks tear
    down together: gloo aborted a rank now and then when its peer still held the connection."""
    if dist.is_available() and dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def all_ranks(flag: bool, device: torch.device) -> bool:
    """True when `flag` holds on every rank (a one-element all-reduce: a host sync)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def setup_torch(*, deterministic: bool, num_threads: int = 0) -> None:
    """The reference's numerics: fp32 matmuls in full precision (codebook labels), bf16 reductions allowed.
    `num_threads` > 0 sets torch's CPU (intra-op) threads; 0 keeps torch's default (OMP_NUM_THREADS, else
    the core count)."""
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
