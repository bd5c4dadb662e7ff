"""Length-bucketed, cropped batches (the reference recipe), split across ranks: `BucketBatchSampler`, `Collator`.

Both take the `DataConfig` and `MaskingConfig` of a training config (`spidr_fast.config`). Utterances
of at least `min_sample_size` samples are grouped by length into `num_buckets` buckets; per epoch,
each bucket is shuffled and batches are filled in bucket order up to `max_batch_length` samples
(each utterance counted at min(length, max_sample_size)); the collator crops every utterance of a
batch at a random offset to the shortest one (and to `max_sample_size`), so nothing is padded and
`attention_mask` is None.

The batch list is a pure function of (random_seed, epoch); batch order is shuffled; the list is
made divisible by `world_size` by splitting the largest batches in two (never by repeating or
dropping one), and rank r takes batches r, r + world_size, ...: every utterance is used exactly
once per epoch across ranks, and every rank runs the same number of steps.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from spidr_fast.config import DataConfig, MaskingConfig
from spidr_fast.data.audio import standardize_on_device
from spidr_fast.data.dataset import Utterance
from spidr_fast.data.masks import compute_mask_indices
from spidr_fast.framing import num_frames


def bucket_ids(lengths: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """Bucket of each (clipped) length: equal-width buckets over [min, max], or length percentiles."""
    if cfg.bucket_method == "uniform":
        bounds = np.linspace(cfg.min_sample_size - 1, cfg.max_sample_size + 1, cfg.num_buckets + 1)
    elif cfg.bucket_method == "percentile":
        bounds = np.quantile(lengths, np.linspace(0, 1, cfg.num_buckets + 1), method="lower")[1:]
    else:
        raise ValueError(f"bucket_method must be 'uniform' or 'percentile', got {cfg.bucket_method!r}")
    return np.searchsorted(bounds, lengths, side="left")


class BucketBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's batches, each a list of `(index, epoch)` keys for `SpeechDataset`.

    Args:
        lengths: samples per utterance (manifest counts), int (N,).
        config: `num_buckets`, `bucket_method`, `min_sample_size`, `max_sample_size`, `max_batch_length`
            and `random_seed` are used.
        rank, world_size: this process's share; batches are split round-robin.
    """

    def __init__(
        self,
        lengths: Sequence[int] | np.ndarray,
        config: DataConfig | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        config = config or DataConfig()
        if not 0 < config.min_sample_size <= config.max_sample_size <= config.max_batch_length:
            raise ValueError(
                "need 0 < min_sample_size <= max_sample_size <= max_batch_length, got "
                f"{config.min_sample_size}, {config.max_sample_size}, {config.max_batch_length}"
            )
        self.config, self.rank, self.world_size = config, rank, world_size
        lengths = np.asarray(lengths, dtype=np.int64)
        self.indices = np.flatnonzero(lengths >= config.min_sample_size)  # shorter ones are too short to train on
        if self.indices.size == 0:
            raise ValueError(f"no utterance has at least min_sample_size={config.min_sample_size} samples")
        self.budget_lengths = np.minimum(lengths[self.indices], config.max_sample_size)
        self.buckets = bucket_ids(self.budget_lengths, config)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches `__iter__` yields (call before each epoch, as with DistributedSampler)."""
        self.epoch = epoch

    def all_batches(self, epoch: int | None = None) -> list[list[int]]:
        """Every rank's batches of `epoch` (dataset indices), in order; rank r's are [r::world_size]."""
        epoch = self.epoch if epoch is None else epoch
        rng = np.random.default_rng([self.config.random_seed, epoch])
        batches = self._bucket(rng)
        batches = [batches[i] for i in rng.permutation(len(batches))]
        return _divisible(batches, self.world_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.all_batches()[self.rank :: self.world_size]:
            yield [(i, self.epoch) for i in batch]

    def __len__(self) -> int:
        return len(self.all_batches()) // self.world_size

    def _bucket(self, rng: np.random.Generator) -> list[list[int]]:
        # Shuffle within buckets, then walk buckets in length order: batches hold similar lengths.
        order = np.lexsort((rng.random(self.indices.size), self.buckets))
        return _greedy(order, self.budget_lengths, self.indices, self.config.max_batch_length)


def _greedy(order: np.ndarray, lengths: np.ndarray, indices: np.ndarray, budget: int) -> list[list[int]]:
    batches: list[list[int]] = []
    current: list[int] = []
    total = 0
    for pos in order.tolist():
        n = int(lengths[pos])
        if current and total + n > budget:
            batches.append(current)
            current, total = [], 0
        current.append(int(indices[pos]))
        total += n
    if current:
        batches.append(current)
    return batches


def _divisible(batches: list[list[int]], world_size: int) -> list[list[int]]:
    """Split the largest batches in halves until every rank gets the same number (each stays in budget)."""
    batches = list(batches)
    while len(batches) % world_size:
        largest = max(range(len(batches)), key=lambda i: len(batches[i]))
        batch = batches[largest]
        if len(batch) < 2:
            raise ValueError(f"{len(batches)} single-utterance batches cannot be shared by {world_size} ranks")
        batches[largest : largest + 1] = [batch[: len(batch) // 2], batch[len(batch) // 2 :]]
    return batches


@dataclass
class Batch:
    """A training batch: `waveforms` float32 (B, T), `mask_indices` int64 (B, M) sorted per row,
    `lengths` int64 (B,) all T, `attention_mask` None (nothing is padded). `skipped`: "NAME: REASON"
    of each bad file dropped from this batch (`skip_bad`); a batch that lost every file has
    `waveforms` of shape (0, 0). Integer batches (every utterance PCM16, `SpeechDataset(integer=True)`):
    `waveforms` int16, not standardised, with `mean`/`scale` float32 (B,) per utterance;
    `device_waveforms` gives the standardised float32 waveforms on the device.
    """

    waveforms: torch.Tensor
    mask_indices: torch.Tensor
    lengths: torch.Tensor
    attention_mask: None = None
    skipped: tuple[str, ...] = ()
    mean: torch.Tensor | None = None  # per utterance, of int16 `waveforms`
    scale: torch.Tensor | None = None

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def device_waveforms(self, device: torch.device | str) -> torch.Tensor:
        """float32 standardised waveforms on `device` (int16 batches are standardised there)."""
        return standardize_on_device(self.waveforms, device, self.mean, self.scale)

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True)."""
        pin = lambda t: None if t is None else t.pin_memory()
        return Batch(
            pin(self.waveforms),
            pin(self.mask_indices),
            pin(self.lengths),
            None,
            self.skipped,
            pin(self.mean),
            pin(self.scale),
        )


class Collator:
    """Turns `Utterance`s into a `Batch`: crop, then span masks; seeded by the batch itself."""

    def __init__(self, data: DataConfig | None = None, masking: MaskingConfig | None = None) -> None:
        self.data = data or DataConfig()
        self.masking = masking or MaskingConfig()

    def __call__(self, items: Sequence[Utterance]) -> Batch:
        good = [u for u in items if u.waveform is not None]
        skipped = tuple(u.error or f"item {u.index}: skipped" for u in items if u.waveform is None)
        # Same batch, same epoch -> same crops and masks, whichever worker collates it.
        rng = np.random.default_rng(
            [self.data.random_seed, 1 + max((u.epoch for u in items), default=0), *sorted(u.index for u in items)]
        )
        if not good:
            empty = torch.zeros((0, 0))
            return Batch(
                empty, torch.zeros((0, 0), dtype=torch.int64), torch.zeros(0, dtype=torch.int64), skipped=skipped
            )
        waves = [u.waveform for u in good]
        stats = None
        if all(u.stats is not None for u in good):  # int16: standardised on the device
            stats = torch.tensor([u.stats for u in good], dtype=torch.float32)
        else:  # a mix: standardise the int16 ones here
            waves = [u.standardized() for u in good]
        size = min(min(w.shape[0] for w in waves), self.data.max_sample_size)
        crops = []
        for w in waves:
            start = int(rng.integers(0, w.shape[0] - size + 1)) if self.data.rand_crop else 0
            crops.append(w[start : start + size])
        waveforms = torch.stack(crops)  # (B, T)
        frames = int(num_frames(size))
        # Per-row lengths (all equal) give per-row rounding of the span count, as the reference's
        # training path does: its collator always passes a padding mask, even an all-False one.
        rows = len(crops)
        mask = compute_mask_indices((rows, frames), lengths=[frames] * rows, config=self.masking, rng=rng)
        lengths = torch.full((len(crops),), size, dtype=torch.int64)
        batch = Batch(waveforms, torch.from_numpy(mask), lengths, skipped=skipped)
        if stats is not None:
            batch.mean, batch.scale = stats[:, 0].contiguous(), stats[:, 1].contiguous()
        return batch
