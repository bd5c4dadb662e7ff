"""Span masking: the C++, NumPy and per-row-loop backends agree with the reference's statistics."""

from math import comb

import numpy as np
import pytest

from spidr_fast.config import MaskingConfig
from spidr_fast.data import masks
from spidr_fast.data.masks import compute_mask_indices

BACKENDS = ["cpp", "numpy", "loop"] if masks.has_cpp() else ["numpy", "loop"]
STRATEGIES = [("static", 0.0), ("uniform", 0.0), ("normal", 2.0), ("poisson", 0.0)]


def runs(row: np.ndarray) -> np.ndarray:
    """Lengths of maximal runs of consecutive positions in a sorted index row."""
    if row.size == 0:
        return np.zeros(0, dtype=np.int64)
    breaks = np.flatnonzero(np.diff(row) != 1)
    ends = np.concatenate([breaks, [row.size - 1]])
    return np.diff(np.concatenate([[-1], ends]))


def draws(backend: str, cfg: MaskingConfig, size: int, n: int, seed: int = 0) -> list[np.ndarray]:
    """n independent rows of `size` frames, each masked alone (untrimmed: the per-row distribution)."""
    rng, sizes = np.random.default_rng(seed), np.full(n, size, dtype=np.int64)
    num_spans = masks._num_spans(sizes, cfg, rng, per_row=True)
    flat, offsets = masks._span_masks(sizes, num_spans, cfg, rng, equalize=False, backend=backend)
    return np.split(flat, offsets[1:-1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("selection", "other"), STRATEGIES)
@pytest.mark.parametrize("no_overlap", [False, True])
def test_shape_sorted_unique_equal_counts(backend: str, selection: str, other: float, no_overlap: bool) -> None:
    cfg = MaskingConfig(mask_selection=selection, mask_other=other, no_mask_overlap=no_overlap)
    lengths = np.array([120, 57, 120, 9, 1, 80])
    for seed in range(5):
        out = compute_mask_indices((6, 120), lengths=lengths, config=cfg, rng=seed, backend=backend)
        assert out.dtype == np.int64 and out.ndim == 2 and out.shape[0] == 6
        assert (np.diff(out, axis=1) > 0).all()  # sorted and unique
        assert (out >= 0).all() and (out < lengths[:, None]).all()
    full = compute_mask_indices((4, 300), config=cfg, rng=1, backend=backend)
    assert full.shape[1] > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_per_seed(backend: str) -> None:
    a = compute_mask_indices((8, 500), rng=np.random.default_rng(3), backend=backend)
    b = compute_mask_indices((8, 500), rng=np.random.default_rng(3), backend=backend)
    c = compute_mask_indices((8, 500), rng=np.random.default_rng(4), backend=backend)
    np.testing.assert_array_equal(a, b)
    assert a.shape != c.shape or not np.array_equal(a, c)


def expected_static_overlap_count(size: int, num_spans: int, length: int) -> float:
    """Exact E[masked frames]: num_spans distinct starts uniform in [0, size - length), spans of `length`."""
    starts = size - length
    total = 0.0
    for t in range(size):
        window = min(t, starts - 1) - max(0, t - length + 1) + 1  # starts that cover frame t
        total += 1 - comb(starts - window, num_spans) / comb(starts, num_spans)
    return total


@pytest.mark.parametrize("backend", BACKENDS)
def test_static_overlap_matches_exact_expectation(backend: str) -> None:
    # 0.8 * 200 / 10 = 16 exactly, so every row has 16 spans whatever the rounding draw.
    counts = np.array([len(r) for r in draws(backend, MaskingConfig(), 200, 3000)])
    expected = expected_static_overlap_count(200, 16, 10)
    assert abs(counts.mean() - expected) < 5 * counts.std() / np.sqrt(counts.size)
    # Overlapping static spans are never clipped: every run of masked frames is at least one span long.
    for row in draws(backend, MaskingConfig(), 200, 200, seed=1):
        assert (runs(row) >= 10).all()


@pytest.mark.parametrize(("selection", "other"), STRATEGIES)
@pytest.mark.parametrize("no_overlap", [False, True])
def test_backends_agree_in_distribution(selection: str, other: float, no_overlap: bool) -> None:
    cfg = MaskingConfig(mask_selection=selection, mask_other=other, no_mask_overlap=no_overlap)
    n = 2000
    stats = {}
    for backend in BACKENDS:
        rows = draws(backend, cfg, 150, n, seed=7)
        counts = np.array([len(r) for r in rows])
        run_lengths = np.concatenate([runs(r) for r in rows])
        stats[backend] = (counts, run_lengths)
    ref_counts, ref_runs = stats["loop"]
    for backend, (counts, run_lengths) in stats.items():
        se = np.sqrt(counts.var() / n + ref_counts.var() / n) + 1e-9
        assert abs(counts.mean() - ref_counts.mean()) < 5 * se, backend
        se_runs = np.sqrt(run_lengths.var() / run_lengths.size + ref_runs.var() / ref_runs.size) + 1e-9
        assert abs(run_lengths.mean() - ref_runs.mean()) < 5 * se_runs, backend
    if no_overlap and selection == "static":
        # min_space=1 keeps spans apart, so the runs are the spans themselves.
        for _, run_lengths in stats.values():
            assert (run_lengths == 10).all()


def test_span_lengths_without_overlap_follow_strategy() -> None:
    """With no overlap (min space 1) runs are spans: their lengths follow the strategy's law."""
    n, backend = 2000, BACKENDS[0]
    uniform = MaskingConfig(mask_selection="uniform", no_mask_overlap=True)
    uni = np.concatenate([runs(r) for r in draws(backend, uniform, 400, n)])
    assert uni.min() >= 1 and uni.max() <= 20  # zero-length spans are invisible
    normal = MaskingConfig(mask_selection="normal", mask_other=2.0, no_mask_overlap=True)
    nor = np.concatenate([runs(r) for r in draws(backend, normal, 400, n)])
    assert abs(nor.mean() - 10) < 0.3 and abs(nor.std() - 2) < 0.3


def test_masked_fraction_close_to_reference_levels() -> None:
    # Long rows: static overlap covers ~1 - exp(-0.8) of frames; without overlap ~0.8 minus what doesn't fit.
    rows = draws(BACKENDS[0], MaskingConfig(), 1000, 300)
    frac = np.mean([len(r) for r in rows]) / 1000
    assert 0.52 < frac < 0.58
    rows = draws(BACKENDS[0], MaskingConfig(no_mask_overlap=True), 1000, 300)
    frac = np.mean([len(r) for r in rows]) / 1000
    assert 0.62 < frac < 0.78


@pytest.mark.parametrize("backend", BACKENDS)
def test_trimming_keeps_uniform_subset(backend: str) -> None:
    # Row 0 (long) is trimmed to row 1's count: its kept frames must still spread over the whole row.
    means = []
    for seed in range(300):
        out = compute_mask_indices((2, 400), lengths=[400, 30], rng=seed, backend=backend)
        means.append(out[0].mean())
    assert abs(np.mean(means) - 199.5) < 12


def test_falls_back_to_numpy_without_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(masks, "_C", None)
    assert not masks.has_cpp()
    out = compute_mask_indices((3, 100), rng=0)
    assert out.shape[0] == 3
    with pytest.raises(RuntimeError, match="not built"):
        compute_mask_indices((3, 100), rng=0, backend="cpp")


def test_bad_arguments_name_the_argument() -> None:
    with pytest.raises(ValueError, match="lengths"):
        compute_mask_indices((2, 10), lengths=[5, 11])
    with pytest.raises(ValueError, match="mask_selection"):
        compute_mask_indices((2, 10), config=MaskingConfig(mask_selection="gauss"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backend"):
        compute_mask_indices((2, 10), backend="gpu")  # type: ignore[arg-type]
