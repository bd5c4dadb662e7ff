"""Training and validation loaders on `spidr_fast.data`, with a batch sampler that resumes mid-epoch.

Batches are a pure function of (seed, epoch, batch position) (`BucketBatchSampler` + the self-seeded
`Collator`), so the sampler position is just (epoch, batches already taken in it). The DataLoader gets
its own torch generator: creating an iterator then never draws from the global RNG, which a resumed
run restores.

With `data.skip_bad`, `SkippedFiles` names each unusable file once (in the main process, whatever the
number of workers), counts the batches left empty (the trainer skips them) and says what to do when
nothing usable is left (`NoUsableDataError`).
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from spidr_fast.config import DataConfig, MaskingConfig
from spidr_fast.data.batching import Batch, BucketBatchSampler, Collator
from spidr_fast.data.dataset import SpeechDataset
from spidr_fast.train.env import all_ranks

logger = logging.getLogger(__name__)


class NoUsableDataError(RuntimeError):
    """Every batch the sampler offered was empty: all its files were skipped as unusable."""


def audio_fix_hint(reasons: Iterable[str]) -> str:
    """What to do about the audio problems in `reasons` ("NAME: REASON" lines), or ""."""
    text = "\n".join(reasons)
    hints = []
    if rates := sorted({int(r) for r in re.findall(r"sample rate (\d+) Hz", text)}):
        hints.append(
            f"SpidR trains on 16 kHz audio and these files are at {', '.join(map(str, rates))} Hz: resample the "
            "corpus first (e.g. `sox IN -r 16000 OUT.wav`, or `ffmpeg -i IN -ar 16000 OUT.wav`) and rewrite the "
            "manifest with `spidr-fast manifest`"
        )
    if re.search(r"\d+ channels, expected mono", text):
        hints.append("downmix to mono first (e.g. `sox IN -c 1 OUT.wav`, or `ffmpeg -i IN -ac 1 OUT.wav`)")
    return "; ".join(hints)


class SkippedFiles:
    """Unusable files (`data.skip_bad`) seen by this process: each logged once, counted, summarised."""

    def __init__(self, manifest: str, split: str = "train") -> None:
        self.manifest, self.split = manifest, split
        self.files: dict[str, None] = {}  # "NAME: REASON", in the order first seen
        self.batches = 0  # batches skipped because every file in them was unusable

    def note(self, batch: Batch) -> bool:
        """Log the batch's newly seen bad files; False when nothing in it is usable (skip the batch)."""
        for message in batch.skipped:
            if message not in self.files:
                self.files[message] = None
                logger.warning("skipping %s (%s: %d unusable file(s) so far)", message, self.split, len(self.files))
        if batch.waveforms.numel() > 0:
            return True
        self.batches += 1
        return False

    def usable(self, batch: Batch, device: torch.device, *, skip_bad: bool, world_size: int) -> bool:
        """`note` the batch, then agree across ranks: with `skip_bad` and several ranks, a batch left empty
        on one rank is skipped on every rank (each forward/backward's collectives need all of them; a
        one-element all-reduce, a host sync). The trainer and validation both decide here."""
        usable = self.note(batch)
        if skip_bad and world_size > 1:
            usable = all_ranks(usable, device)
        return usable

    def counts(self) -> dict[str, int]:
        return {"skipped_files": len(self.files), "skipped_batches": self.batches}

    def summary(self) -> str:
        """One line: how many files and batches were skipped, and what to do about them."""
        hint = audio_fix_hint(self.files)
        return (
            f"{len(self.files)} unusable file(s) in {self.manifest} skipped (named in the warnings above), "
            f"{self.batches} batch(es) left empty and skipped" + (f"; to use them: {hint}" if hint else "")
        )

    def nothing_usable(self, where: str) -> NoUsableDataError:
        examples = list(self.files)[:3]
        more = len(self.files) - len(examples)
        hint = audio_fix_hint(self.files)
        return NoUsableDataError(
            f"no usable audio in data.manifest={self.manifest}: {where}; {len(self.files)} file(s) are unusable, e.g. "
            + "; ".join(examples)
            + (f" (and {more} more)" if more > 0 else "")
            + (f". To fix: {hint}" if hint else "")
        )


def first_usable_batch(
    loader: DataLoader, sampler: ResumableBatchSampler, dataset: SpeechDataset, skipped: SkippedFiles
) -> Batch:
    """The first batch of the sampler's epoch with audio in it, read in this process; raises
    `NoUsableDataError` when every batch of the epoch is empty."""
    for keys in sampler:
        batch = loader.collate_fn([dataset[key] for key in keys])
        if skipped.note(batch):
            return batch
    raise skipped.nothing_usable(f"all {len(sampler)} batch(es) of an epoch are empty")


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
    cfg: DataConfig, masking: MaskingConfig, *, rank: int, world_size: int, seed: int, log_skipped: bool = True
) -> tuple[DataLoader, ResumableBatchSampler, SpeechDataset]:
    """`log_skipped=False`: the dataset does not log skipped files (the caller does, from `Batch.skipped`)."""
    if not cfg.manifest:
        raise ValueError("data.manifest is not set")
    # PCM16 audio stays int16 up to the device, where `Batch.device_waveforms` standardises it.
    dataset = SpeechDataset(
        cfg.manifest, normalize=cfg.normalize, skip_bad=cfg.skip_bad, log_skipped=log_skipped, integer=True
    )
    sampler = ResumableBatchSampler(BucketBatchSampler(dataset.lengths, cfg, rank=rank, world_size=world_size))
    workers = cfg.num_workers
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=Collator(cfg, masking),
        num_workers=workers,
        pin_memory=pin_memory(cfg),
        prefetch_factor=cfg.prefetch_factor if workers > 0 else None,
        persistent_workers=cfg.persistent_workers and workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, sampler, dataset
