"""Unit-quality metrics on hand-computed examples."""

from math import log2

import numpy as np
import pytest

from spidr_fast.metrics import (
    align,
    bitrate,
    cluster_purity,
    contingency,
    perplexity,
    phone_purity,
    pnmi,
    unit_metrics,
)


def test_small_contingency_table_by_hand() -> None:
    counts = np.array([[2, 1], [0, 1]])  # rows: phones, columns: units; 4 frames
    assert phone_purity(counts) == pytest.approx(3 / 4)  # unit 0 -> 2 of phone 0, unit 1 -> 1
    assert cluster_purity(counts) == pytest.approx(3 / 4)
    h_y = -(3 / 4) * log2(3 / 4) - (1 / 4) * log2(1 / 4)
    mutual = 0.5 * log2(0.5 / (0.75 * 0.5)) + 0.25 * log2(0.25 / (0.75 * 0.5)) + 0.25 * log2(0.25 / (0.25 * 0.5))
    assert pnmi(counts) == pytest.approx(mutual / h_y)


def test_contingency_counts_pairs() -> None:
    counts, phones, ids = contingency([5, 5, 7, 7, 7], ["a", "b", "b", "b", "a"])
    assert phones == ["a", "b"] and ids == [5, 7]
    assert counts.tolist() == [[1, 1], [1, 2]]


def test_perfect_and_useless_units() -> None:
    rng = np.random.default_rng(0)
    phones = rng.choice(list("abcdefgh"), size=4000)
    perfect = np.searchsorted(np.array(list("abcdefgh")), phones)
    counts, _, _ = contingency(perfect, phones)
    assert pnmi(counts) == pytest.approx(1.0) and phone_purity(counts) == 1.0 and cluster_purity(counts) == 1.0
    # Splitting every phone over 4 units keeps phone purity and PNMI at 1 but lowers cluster purity.
    split = perfect * 4 + rng.integers(0, 4, size=phones.size)
    counts, _, _ = contingency(split, phones)
    assert pnmi(counts) == pytest.approx(1.0) and phone_purity(counts) == 1.0 and cluster_purity(counts) < 0.3
    counts, _, _ = contingency(np.zeros(phones.size, dtype=int), phones)
    assert pnmi(counts) == pytest.approx(0.0)
    counts, _, _ = contingency(rng.integers(0, 8, size=phones.size), phones)
    assert pnmi(counts) < 0.02


def test_perplexity_and_bitrate_by_hand() -> None:
    assert perplexity([0, 1, 2, 3]) == pytest.approx(4.0)
    assert perplexity([3, 3, 3]) == pytest.approx(1.0)
    seq = np.array([0, 0, 1, 1, 2, 2])  # 0.12 s at 50 Hz
    assert bitrate([seq], 50) == pytest.approx(3 / 0.12 * log2(3))  # 3 tokens after merging runs
    assert bitrate([seq], 50, deduplicate=False) == pytest.approx(50 * log2(3))


def test_align_repeats_units_to_10ms_frames() -> None:
    u, y = align(np.array([4, 9, 9]), list("aabbccd"), unit_rate=50, label_rate=100)
    assert u.tolist() == [4, 4, 9, 9, 9, 9] and y.tolist() == list("aabbcc")
    u, y = align(np.array([1, 2]), ["x"], unit_rate=100, label_rate=50)
    assert u.tolist() == [1, 2] and y.tolist() == ["x", "x"]
    with pytest.raises(ValueError, match="integer multiples"):
        align(np.array([1]), ["x"], unit_rate=50, label_rate=75)


def test_unit_metrics_end_to_end() -> None:
    alignments = {"u1": list("aabbbbcc"), "u2": list("ccaa"), "only_here": list("ab")}
    units = {"u1": np.array([0, 1, 1, 2]), "u2": np.array([2, 0]), "unaligned": np.array([5])}
    m = unit_metrics(units, alignments)
    assert m.pnmi == pytest.approx(1.0) and m.phone_purity == 1.0 and m.cluster_purity == 1.0
    assert m.active_codewords == 3 and m.num_frames == 12
    assert m.perplexity == pytest.approx(2 ** -(3 * (1 / 3) * log2(1 / 3)))
    ignored = unit_metrics(units, alignments, ignore=["c"])
    assert ignored.num_frames == 8  # the 4 "c" frames left out
    with pytest.raises(ValueError, match="no fileid"):
        unit_metrics({"x": np.array([1])}, alignments)
