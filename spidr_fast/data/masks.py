"""Span masking over frames (wav2vec 2.0 / HuBERT / SpidR), as sorted positions.

`compute_mask_indices` returns `mask_indices` of shape (batch, num_masked), int64, sorted per row,
every row holding the same number of masked frames (denser rows are trimmed at random to the
sparsest one), which is what the model gathers at.

Semantics (the reference recipe, in distribution): per row, num_spans = max(min_masks,
int(mask_prob * frames / mask_length + u)) with u ~ U[0, 1) (one draw for the batch when `lengths`
is None, one per row when it is given, as in the reference's training path, which always passes a
padding mask); span lengths by strategy (static: mask_length;
uniform: integers in [int(mask_other), 2 * mask_length]; normal: max(1, round(N(mask_length,
mask_other))); poisson: Poisson(U[0, mask_length)) per span); if all lengths are 0 the first
becomes min(mask_length, frames - 1). With overlap: distinct starts drawn uniformly in
[0, frames - min_length) (min_length lowered to frames - num_spans - 1 when that range would hold
no more than num_spans starts), spans clipped to the row. Without overlap: longest spans first, each
in a free part chosen with probability proportional to its length, keeping `min_space` frames apart.

Three interchangeable backends, equal in distribution (not draw for draw):
- "cpp": the `spidr_fast._C` extension (the default when it is built);
- "numpy": vectorised over the batch (overlap mode; no-overlap is sequential by nature and uses
  the per-row loop), used when the extension is missing (e.g. SPIDR_FAST_SKIP_EXT=1);
- "loop": a straightforward per-row loop, the readable reference the others are tested against.
Every backend is deterministic given the `numpy.random.Generator` (or seed) passed in.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from spidr_fast.config import MaskingConfig

try:
    from spidr_fast import _C
except ImportError:  # built without the extension: the NumPy path serves
    _C = None

Backend = Literal["auto", "cpp", "numpy", "loop"]
_STRATEGIES: dict[str, int] = {"static": 0, "uniform": 1, "normal": 2, "poisson": 3}


def has_cpp() -> bool:
    """Whether the C++ masker (`spidr_fast._C`) is available."""
    return _C is not None


def as_generator(rng: np.random.Generator | int | None) -> np.random.Generator:
    """A `numpy.random.Generator` from a generator, a seed, or None (fresh entropy)."""
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def compute_mask_indices(
    shape: tuple[int, int],
    *,
    lengths: np.ndarray | list[int] | None = None,
    config: MaskingConfig | None = None,
    rng: np.random.Generator | int | None = None,
    backend: Backend = "auto",
) -> np.ndarray:
    """Sorted masked frame positions, the same count for every row.

    Args:
        shape: (batch, frames) of the frame axis being masked.
        lengths: optional int (batch,) valid frames per row (frames beyond are padding and never
            masked); None means every row has `frames` valid frames.
        config: masking hyper-parameters (None: the defaults; `mask_channel_*` are not used).
        rng: numpy Generator or seed; the result is a pure function of it.
        backend: "auto" (C++ if built, else NumPy), "cpp", "numpy" or "loop".

    Returns:
        int64 (batch, num_masked), each row sorted ascending, unique, within its valid frames.
    """
    batch, frames = shape
    config = config or MaskingConfig()
    rng = as_generator(rng)
    if lengths is None:
        sizes = np.full(batch, frames, dtype=np.int64)
    else:
        sizes = np.asarray(lengths, dtype=np.int64).reshape(-1)
        if sizes.shape[0] != batch or (sizes > frames).any() or (sizes < 0).any():
            raise ValueError(f"lengths must hold {batch} values in [0, {frames}], got {sizes.tolist()}")
    num_spans = _num_spans(sizes, config, rng, per_row=lengths is not None)
    flat, _ = _span_masks(sizes, num_spans, config, rng, equalize=True, backend=backend)
    return flat.reshape(batch, -1)


def _num_spans(sizes: np.ndarray, cfg: MaskingConfig, rng: np.random.Generator, *, per_row: bool) -> np.ndarray:
    # `+ u` is probabilistic rounding: the expected span count is exactly mask_prob * size / mask_length.
    u = rng.random(sizes.shape[0]) if per_row else np.full(sizes.shape[0], rng.random())
    spans = (cfg.mask_prob * sizes / float(cfg.mask_length) + u).astype(np.int64)
    return np.maximum(cfg.min_masks, spans)


def _span_masks(
    sizes: np.ndarray,
    num_spans: np.ndarray,
    cfg: MaskingConfig,
    rng: np.random.Generator,
    *,
    equalize: bool,
    backend: Backend,
) -> tuple[np.ndarray, np.ndarray]:
    """(flat int64 (N,), offsets int64 (B + 1,)): row i is flat[offsets[i]:offsets[i + 1]]."""
    if cfg.mask_selection not in _STRATEGIES:
        raise ValueError(f"mask_selection must be one of {sorted(_STRATEGIES)}, got {cfg.mask_selection!r}")
    if cfg.mask_length < 1:
        raise ValueError(f"mask_length must be >= 1, got {cfg.mask_length}")
    if backend == "auto":
        backend = "cpp" if _C is not None else "numpy"
    if backend == "cpp":
        if _C is None:
            raise RuntimeError("spidr_fast._C is not built (reinstall without SPIDR_FAST_SKIP_EXT=1)")
        seed = int(rng.integers(0, 2**63, dtype=np.int64))
        return _C.span_masks(
            sizes,
            num_spans,
            cfg.mask_length,
            _STRATEGIES[cfg.mask_selection],
            float(cfg.mask_other),
            cfg.no_mask_overlap,
            cfg.mask_min_space,
            seed,
            equalize,
        )
    if backend == "numpy" and not cfg.no_mask_overlap:
        marks = _numpy_overlap_marks(sizes, num_spans, cfg, rng)
    elif backend in ("numpy", "loop"):
        marks = np.zeros((sizes.shape[0], int(sizes.max(initial=0))), dtype=bool)
        for row, (size, n) in enumerate(zip(sizes.tolist(), num_spans.tolist(), strict=True)):
            marks[row, _loop_row(size, n, cfg, rng)] = True
    else:
        raise ValueError(f"backend must be 'auto', 'cpp', 'numpy' or 'loop', got {backend!r}")
    return _flatten_marks(marks, rng, equalize=equalize)


def _draw_lengths(shape: tuple[int, ...], cfg: MaskingConfig, rng: np.random.Generator) -> np.ndarray:
    length = cfg.mask_length
    if cfg.mask_selection == "static":
        return np.full(shape, length, dtype=np.int64)
    if cfg.mask_selection == "uniform":
        return rng.integers(int(cfg.mask_other), 2 * length + 1, size=shape, dtype=np.int64)
    if cfg.mask_selection == "normal":
        # np.rint rounds half to even, like torch.round.
        return np.maximum(1, np.rint(rng.normal(length, cfg.mask_other, size=shape))).astype(np.int64)
    return rng.poisson(rng.random(shape) * length).astype(np.int64)


def _loop_row(size: int, num_spans: int, cfg: MaskingConfig, rng: np.random.Generator) -> list[int]:
    """One row, the straightforward way: span lengths, then starts, then the union of spans."""
    if size <= 0 or num_spans <= 0:
        return []
    lengths = _draw_lengths((num_spans,), cfg, rng).tolist()
    if sum(lengths) == 0:
        lengths[0] = min(cfg.mask_length, size - 1)
    if cfg.no_mask_overlap:
        return sorted(_place_without_overlap(size, lengths, cfg.mask_min_space, rng))
    min_len = min(lengths)
    if size - min_len <= num_spans:
        min_len = size - num_spans - 1
    starts = rng.permutation(size - min_len)[:num_spans].tolist()
    return sorted(
        {s + o for s, n in zip(starts, lengths[: len(starts)], strict=True) for o in range(n) if s + o < size}
    )


def _place_without_overlap(size: int, lengths: list[int], min_space: int, rng: np.random.Generator) -> list[int]:
    keep = min(lengths)
    parts = [(0, size)]
    chosen: list[int] = []
    for length in sorted(lengths, reverse=True):
        weights = np.array([e - s if e - s >= length + min_space else 0 for s, e in parts], dtype=np.int64)
        total = int(weights.sum())
        if total == 0:
            break
        c = int(np.searchsorted(np.cumsum(weights), rng.integers(total), side="right"))
        s, e = parts.pop(c)
        start = int(rng.integers(s, e - length)) if e - length > s else s
        chosen.extend(range(start, min(size, start + length)))
        if start - s - min_space >= keep:
            parts.append((s, start - min_space + 1))
        if e - start - keep - min_space > keep:
            parts.append((start + length + min_space, e))
    return chosen


def _numpy_overlap_marks(
    sizes: np.ndarray, num_spans: np.ndarray, cfg: MaskingConfig, rng: np.random.Generator
) -> np.ndarray:
    """Boolean (B, max(sizes)) union of spans, overlap allowed, vectorised over rows and spans."""
    batch = sizes.shape[0]
    width = int(sizes.max(initial=0))
    kmax = int(num_spans.max(initial=0))
    marks = np.zeros((batch, width), dtype=bool)
    if kmax == 0 or width == 0:
        return marks
    slots = np.arange(kmax)
    in_row = (slots < num_spans[:, None]) & (sizes[:, None] > 0)  # (B, kmax)
    lengths = np.where(in_row, _draw_lengths((batch, kmax), cfg, rng), 0)
    all_zero = in_row[:, 0] & (lengths.sum(1) == 0)
    lengths[all_zero, 0] = np.minimum(cfg.mask_length, sizes[all_zero] - 1)
    min_len = np.where(in_row, lengths, np.iinfo(np.int64).max).min(1)
    min_len = np.where(sizes - min_len <= num_spans, sizes - num_spans - 1, min_len)
    num_starts = np.where(sizes > 0, sizes - min_len, 0)  # (B,) size of the start range
    # Distinct uniform starts: the positions of the smallest i.i.d. keys (invalid positions sort last).
    keys = rng.random((batch, int(num_starts.max())))
    keys[np.arange(keys.shape[1]) >= num_starts[:, None]] = 2.0
    starts = np.argsort(keys, axis=1)[:, :kmax]  # (B, min(kmax, max start range))
    used = in_row[:, : starts.shape[1]] & (slots[: starts.shape[1]] < num_starts[:, None])
    lengths = lengths[:, : starts.shape[1]]
    offsets = np.arange(int(lengths.max(initial=0)))
    pos = starts[:, :, None] + offsets  # (B, k, max_len)
    keep = used[:, :, None] & (offsets < lengths[:, :, None]) & (pos < sizes[:, None, None])
    rows = np.broadcast_to(np.arange(batch)[:, None, None], pos.shape)
    marks[rows[keep], pos[keep]] = True
    return marks


def _flatten_marks(marks: np.ndarray, rng: np.random.Generator, *, equalize: bool) -> tuple[np.ndarray, np.ndarray]:
    counts = marks.sum(1)
    if equalize and marks.shape[0] > 0:
        target = int(counts.min())
        # A uniform `target`-subset of each row's marks: the smallest i.i.d. keys among marked frames.
        keys = np.where(marks, rng.random(marks.shape), 2.0)
        picked = np.sort(np.argsort(keys, axis=1)[:, :target], axis=1).astype(np.int64)
        return picked.reshape(-1), np.arange(marks.shape[0] + 1, dtype=np.int64) * target
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return np.nonzero(marks)[1].astype(np.int64), offsets
