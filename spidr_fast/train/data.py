"""Training and validation loaders on `spidr_fast.data`, with a batch sampler that resumes mid-epoch.

Batches are a pure function of (seed, epoch, batch position) (`BucketBatchSampler` + the self-seeded
`Collator`), so the sampler position is just (epoch, batches already taken in it). The DataLoader gets
its own torch generator: creating an iterator then never draws from the global RNG, which a resumed
run restores.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from spidr_fast.data.batching import BucketBatchSampler, Collator
from spidr_fast.data.dataset import SpeechDataset
from spidr_fast.train.config import DataConfig, MaskingConfig


class ResumableBatchSampler(Sampler):
    """`BucketBatchSampler` whose epoch starts at batch `start` (the resume position)."""

    def __init__(self, inner: BucketBatchSampler) -> None:
        self.inner = inner
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.inner.set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return itertools.islice(iter(self.inner), self.start, None)

    def __len__(self) -> int:
        return max(0, len(self.inner) - self.start)


def pin_memory(cfg: DataConfig) -> bool:
    """`data.pin_memory`, None meaning: pin when CUDA is available (the trainer's non_blocking copies then
    overlap; from pageable memory they block)."""
    return torch.cuda.is_available() and (cfg.pin_memory is None or cfg.pin_memory)


def build_loader(
    cfg: DataConfig, masking: MaskingConfig, *, rank: int, world_size: int, seed: int
) -> tuple[DataLoader, ResumableBatchSampler, SpeechDataset]:
    if not cfg.manifest:
        raise ValueError("data.manifest is not set")
    dataset = SpeechDataset(cfg.manifest, normalize=cfg.normalize, skip_bad=cfg.skip_bad)
    batching = cfg.batching()
    sampler = ResumableBatchSampler(BucketBatchSampler(dataset.lengths, batching, rank=rank, world_size=world_size))
    workers = cfg.num_workers
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=Collator(batching, masking.data_masking()),
        num_workers=workers,
        pin_memory=pin_memory(cfg),
        prefetch_factor=cfg.prefetch_factor if workers > 0 else None,
        persistent_workers=cfg.persistent_workers and workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, sampler, dataset
