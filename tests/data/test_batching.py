"""Batching: deterministic per (seed, epoch), every utterance once per epoch, ranks disjoint, budgets held."""

import dataclasses
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from spidr_fast.config import DataConfig
from spidr_fast.data.batching import (
    Batch,
    BucketBatchSampler,
    Collator,
    num_frames,
)
from spidr_fast.data.dataset import Utterance

# Small budgets keep these fast: 40 k samples per batch, utterances of 0.1-3 s.
SMALL = DataConfig(num_buckets=50, min_sample_size=2000, max_sample_size=32_000, max_batch_length=40_000)


def lengths(n: int = 300, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1000, 38_000, n)


def test_deterministic_per_seed_and_epoch() -> None:
    cfg = SMALL
    a, b = BucketBatchSampler(lengths(), cfg), BucketBatchSampler(lengths(), cfg)
    assert a.all_batches(0) == b.all_batches(0)
    assert a.all_batches(0) != a.all_batches(1)
    other = BucketBatchSampler(lengths(), dataclasses.replace(cfg, random_seed=1))
    assert other.all_batches(0) != a.all_batches(0)
    a.set_epoch(1)
    assert [[i for i, _ in batch] for batch in a] == a.all_batches(1)
    assert all(e == 1 for batch in a for _, e in batch)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_utterance_once_per_epoch_across_ranks(world_size: int) -> None:
    cfg = SMALL
    lens = lengths()
    eligible = set(np.flatnonzero(lens >= cfg.min_sample_size).tolist())
    for epoch in range(3):
        seen: Counter[int] = Counter()
        steps = set()
        for rank in range(world_size):
            sampler = BucketBatchSampler(lens, cfg, rank=rank, world_size=world_size)
            sampler.set_epoch(epoch)
            batches = list(sampler)
            steps.add(len(batches))
            assert len(batches) == len(sampler)
            seen.update(i for batch in batches for i, _ in batch)
        assert set(seen) == eligible and max(seen.values()) == 1  # each once, none dropped, none repeated
        assert len(steps) == 1  # every rank runs the same number of steps


def test_batches_respect_budget() -> None:
    lens = lengths()
    for batch in BucketBatchSampler(lens, SMALL).all_batches(0):
        assert np.minimum(lens[batch], SMALL.max_sample_size).sum() <= SMALL.max_batch_length


def test_buckets_group_similar_lengths() -> None:
    lens = lengths(2000)
    batches = BucketBatchSampler(lens, SMALL).all_batches(0)
    spread = np.mean([np.ptp(np.minimum(lens[b], 32_000)) for b in batches if len(b) > 1])
    assert spread < 2000  # vs ~30 000 for random grouping


def utterances(lens: list[int], epoch: int = 0) -> list[Utterance]:
    return [Utterance(i, epoch, torch.randn(n)) for i, n in enumerate(lens)]


def test_cropped_collator() -> None:
    items = utterances([5000, 7000, 6400])
    batch = Collator(SMALL)(items)
    assert batch.waveforms.shape == (3, 5000) and batch.attention_mask is None
    frames = int(num_frames(5000))
    assert batch.mask_indices.dtype == torch.int64 and batch.mask_indices.shape[0] == 3
    assert int(batch.mask_indices.max()) < frames and (batch.mask_indices.diff(dim=1) > 0).all()
    for row, u in zip(batch.waveforms, items, strict=True):  # each row is a contiguous crop of its utterance
        start = int(torch.nonzero(u.waveform == row[0])[0])
        torch.testing.assert_close(u.waveform[start : start + 5000], row)
    again = Collator(SMALL)(items)
    torch.testing.assert_close(again.waveforms, batch.waveforms)
    assert torch.equal(again.mask_indices, batch.mask_indices)
    other_epoch = Collator(SMALL)(utterances([5000, 7000, 6400], epoch=1))
    assert not torch.equal(other_epoch.mask_indices, batch.mask_indices)


def test_collator_drops_skipped_and_counts() -> None:
    items = utterances([5000, 7000])
    items[1] = Utterance(1, 0, None)
    batch = Collator(SMALL)(items)
    assert batch.waveforms.shape == (1, 5000) and batch.num_skipped == 1
    empty = Collator(SMALL)([Utterance(0, 0, None)])
    assert empty.waveforms.shape[0] == 0 and empty.num_skipped == 1


class FakeDataset(torch.utils.data.Dataset):
    def __init__(self, lens: np.ndarray) -> None:
        self.lens = lens

    def __len__(self) -> int:
        return len(self.lens)

    def __getitem__(self, key: tuple[int, int]) -> Utterance:
        i, epoch = key
        return Utterance(i, epoch, torch.full((int(self.lens[i]),), float(i)))


def test_dataloader_end_to_end() -> None:
    lens = lengths(60)
    sampler = BucketBatchSampler(lens, SMALL)
    loader = DataLoader(FakeDataset(lens), batch_sampler=sampler, collate_fn=Collator(SMALL))
    batches = list(loader)
    assert all(isinstance(b, Batch) for b in batches) and len(batches) == len(sampler)
    assert sum(b.waveforms.shape[0] for b in batches) == int((lens >= 2000).sum())


def test_bad_configs_are_named() -> None:
    with pytest.raises(ValueError, match="rank"):
        BucketBatchSampler(lengths(), SMALL, rank=2, world_size=2)
    with pytest.raises(ValueError, match="min_sample_size"):
        BucketBatchSampler([100, 200], SMALL)
