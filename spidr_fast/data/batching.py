"""Length-bucketed batches (cropped, the reference recipe) or packed batches, split across ranks.

Cropped mode (the reference's): utterances of at least `min_sample_size` samples are grouped by
length into `num_buckets` buckets; per epoch, each bucket is shuffled and batches are filled in
bucket order up to `max_batch_length` samples (each utterance counted at min(length,
max_sample_size)); the collator crops every utterance of a batch at a random offset to the
shortest one (and to `max_sample_size`), so nothing is padded and `attention_mask` is None.

Packed mode: whole utterances are shuffled and packed, first fit over a few open batches, up to
`max_batch_length` samples; the collator concatenates them and gives `cu_seqlens`, for
variable-length attention. Nothing is cropped or padded.

Both modes: the batch list is a pure function of (seed, epoch); batch order is shuffled; the list
is made divisible by `world_size` by splitting the largest batches in two (never by repeating or
dropping one), and rank r takes batches r, r + world_size, ...: every utterance is used exactly
once per epoch across ranks, and every rank runs the same number of steps.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from spidr_fast.config import SAMPLE_RATE
from spidr_fast.data.audio import standardize_int16, standardize_on_device
from spidr_fast.data.dataset import Utterance
from spidr_fast.data.masks import MaskingConfig, compute_mask_indices, compute_packed_mask_indices
from spidr_fast.framing import num_frames


@dataclass(frozen=True, kw_only=True)
class BatchingConfig:
    """Batching hyper-parameters; defaults are the reference's `DataConfig`."""

    num_buckets: int = 1000
    min_sample_size: int = 2000
    max_sample_size: int = 320_000
    max_batch_length: int = 3_800_000  # samples per batch per GPU (~237 s at 16 kHz)
    bucket_method: Literal["uniform", "percentile"] = "uniform"
    rand_crop: bool = True
    packed: bool = False
    seed: int = 0
    open_bins: int = 8  # packed mode: batches kept open for first fit (more = fuller, less random)


def bucket_ids(lengths: np.ndarray, cfg: BatchingConfig) -> np.ndarray:
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
        config: batching hyper-parameters (`packed` picks the mode).
        rank, world_size: this process's share; batches are split round-robin.
    """

    def __init__(
        self,
        lengths: Sequence[int] | np.ndarray,
        config: BatchingConfig = BatchingConfig(),
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
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
        if config.packed:
            self.budget_lengths = lengths[self.indices]
            too_long = self.indices[self.budget_lengths > config.max_batch_length]
            if too_long.size:
                raise ValueError(f"utterances {too_long[:5].tolist()} exceed max_batch_length, cannot be packed whole")
        else:
            self.budget_lengths = np.minimum(lengths[self.indices], config.max_sample_size)
            self.buckets = bucket_ids(self.budget_lengths, config)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches `__iter__` yields (call before each epoch, as with DistributedSampler)."""
        self.epoch = epoch

    def all_batches(self, epoch: int | None = None) -> list[list[int]]:
        """Every rank's batches of `epoch` (dataset indices), in order; rank r's are [r::world_size]."""
        epoch = self.epoch if epoch is None else epoch
        rng = np.random.default_rng([self.config.seed, epoch])
        batches = self._pack(rng) if self.config.packed else self._bucket(rng)
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

    def _pack(self, rng: np.random.Generator) -> list[list[int]]:
        budget, open_bins = self.config.max_batch_length, max(1, self.config.open_bins)
        closed: list[list[int]] = []
        bins: list[tuple[int, list[int]]] = []  # (samples used, dataset indices)
        for pos in rng.permutation(self.indices.size):
            n = int(self.budget_lengths[pos])
            slot = next((b for b, (used, _) in enumerate(bins) if used + n <= budget), None)
            if slot is None:
                if len(bins) == open_bins:  # close the fullest to make room
                    closed.append(bins.pop(max(range(len(bins)), key=lambda b: bins[b][0]))[1])
                bins.append((0, []))
                slot = len(bins) - 1
            used, members = bins[slot]
            members.append(int(self.indices[pos]))
            bins[slot] = (used + n, members)
        return closed + [members for _, members in bins]


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
    """A training batch.

    Cropped mode: `waveforms` float32 (B, T), `mask_indices` int64 (B, M) sorted per row,
    `lengths` int64 (B,) all T, `cu_seqlens`/`cu_frames` None.
    Packed mode: `waveforms` float32 (1, S) the utterances back to back, `lengths` int64 (n,) samples
    per utterance, `cu_seqlens` int32 (n + 1,) sample offsets, `cu_frames` int32 (n + 1,) frame
    offsets (each utterance framed alone), `mask_indices` int64 (1, M) positions in the packed frame axis.
    `attention_mask` is None (nothing is padded). `skipped`: "NAME: REASON" of each bad file dropped
    from this batch (`skip_bad`); a batch that lost every file has `waveforms` of shape (0, 0).
    Integer batches (every utterance PCM16, `SpeechDataset(integer=True)`): `waveforms` int16, not
    standardised, with `mean`/`scale` float32 per utterance ((B,), packed (n,)); `device_waveforms` gives
    the standardised float32 waveforms on the device.
    """

    waveforms: torch.Tensor
    mask_indices: torch.Tensor
    lengths: torch.Tensor
    attention_mask: None = None
    cu_seqlens: torch.Tensor | None = None
    cu_frames: torch.Tensor | None = None
    skipped: tuple[str, ...] = ()
    mean: torch.Tensor | None = None  # per utterance, of int16 `waveforms`
    scale: torch.Tensor | None = None

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def device_waveforms(self, device: torch.device | str) -> torch.Tensor:
        """float32 standardised waveforms on `device` (int16 batches are standardised there)."""
        lengths = self.lengths if self.cu_seqlens is not None else None
        return standardize_on_device(self.waveforms, device, self.mean, self.scale, lengths)

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True)."""
        pin = lambda t: None if t is None else t.pin_memory()
        return Batch(
            pin(self.waveforms),
            pin(self.mask_indices),
            pin(self.lengths),
            None,
            pin(self.cu_seqlens),
            pin(self.cu_frames),
            self.skipped,
            pin(self.mean),
            pin(self.scale),
        )


class Collator:
    """Turns `Utterance`s into a `Batch`: crop (or pack), then span masks; seeded by the batch itself."""

    def __init__(self, batching: BatchingConfig | None = None, masking: MaskingConfig | None = None) -> None:
        self.batching = batching or BatchingConfig()
        self.masking = masking or MaskingConfig()

    def __call__(self, items: Sequence[Utterance]) -> Batch:
        good = [u for u in items if u.waveform is not None]
        skipped = tuple(u.error or f"item {u.index}: skipped" for u in items if u.waveform is None)
        # Same batch, same epoch -> same crops and masks, whichever worker collates it.
        rng = np.random.default_rng(
            [self.batching.seed, 1 + max((u.epoch for u in items), default=0), *sorted(u.index for u in items)]
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
            waves = [w if u.stats is None else standardize_int16(w, *u.stats) for u, w in zip(good, waves)]
        batch = self._packed(waves, rng, skipped) if self.batching.packed else self._cropped(waves, rng, skipped)
        if stats is not None:
            batch.mean, batch.scale = stats[:, 0].contiguous(), stats[:, 1].contiguous()
        return batch

    def _cropped(self, waves: list[torch.Tensor], rng: np.random.Generator, skipped: tuple[str, ...]) -> Batch:
        size = min(min(w.shape[0] for w in waves), self.batching.max_sample_size)
        crops = []
        for w in waves:
            start = int(rng.integers(0, w.shape[0] - size + 1)) if self.batching.rand_crop else 0
            crops.append(w[start : start + size])
        waveforms = torch.stack(crops)  # (B, T)
        frames = int(num_frames(size))
        # Per-row lengths (all equal) give per-row rounding of the span count, as the reference's
        # training path does: its collator always passes a padding mask, even an all-False one.
        rows = len(crops)
        mask = compute_mask_indices((rows, frames), lengths=[frames] * rows, config=self.masking, rng=rng)
        lengths = torch.full((len(crops),), size, dtype=torch.int64)
        return Batch(waveforms, torch.from_numpy(mask), lengths, skipped=skipped)

    def _packed(self, waves: list[torch.Tensor], rng: np.random.Generator, skipped: tuple[str, ...]) -> Batch:
        lengths = np.array([w.shape[0] for w in waves], dtype=np.int64)
        frames = num_frames(lengths)
        mask = compute_packed_mask_indices(frames, config=self.masking, rng=rng)
        cu = lambda x: torch.from_numpy(np.concatenate([[0], np.cumsum(x)]).astype(np.int32))
        return Batch(
            torch.cat(waves)[None],
            torch.from_numpy(mask)[None],
            torch.from_numpy(lengths),
            cu_seqlens=cu(lengths),
            cu_frames=cu(frames),
            skipped=skipped,
        )


def librispeech_like_lengths(num: int, seed: int = 0, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Synthetic utterance lengths (samples) shaped like LibriSpeech train (2-35 s, mean ~13 s).

    A rough mixture, not LibriSpeech itself: 60% near the segmenter's usual ~14.5 s (normal, sd 1.5),
    35% uniform in 2-17 s, 5% uniform in 17-35 s.
    """
    rng = np.random.default_rng(seed)
    which = rng.random(num)
    seconds = np.where(
        which < 0.6,
        rng.normal(14.5, 1.5, num),
        np.where(which < 0.95, rng.uniform(2, 17, num), rng.uniform(17, 35, num)),
    )
    return (np.clip(seconds, 2, 35) * sample_rate).astype(np.int64)


def audio_kept(lengths: Sequence[int] | np.ndarray, config: BatchingConfig = BatchingConfig()) -> dict[str, float]:
    """Fraction of the audio each mode trains on, and how full its batches are (one epoch, seed of `config`).

    Returns keys `cropped_kept`, `packed_kept` (trained samples / all samples), `cropped_fill`,
    `packed_fill` (trained samples / (batches x max_batch_length)), `cropped_batches`, `packed_batches`.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    total = float(lengths.sum())
    out: dict[str, float] = {}
    for mode, packed in (("cropped", False), ("packed", True)):
        cfg = BatchingConfig(**{**config.__dict__, "packed": packed})
        batches = BucketBatchSampler(lengths, cfg).all_batches(0)
        if packed:
            used = sum(int(lengths[b].sum()) for b in batches)
        else:
            used = sum(len(b) * min(int(lengths[b].min()), cfg.max_sample_size) for b in batches)
        out[f"{mode}_kept"] = used / total
        out[f"{mode}_fill"] = used / (len(batches) * cfg.max_batch_length)
        out[f"{mode}_batches"] = float(len(batches))
    return out
