"""Discrete units from features: k-means on the project's codebook kernels, and merged runs of units.

`KMeans(k, ...)` fits centroids to (frames, dim) features with k-means++ seeding and Lloyd
iterations, each a `spidr_fast.kernels.codebook_assign_accumulate` on CUDA (the fused Triton
kernels), and on the CPU (or in fp64) the same arithmetic in plain PyTorch: one GEMM for the
distances, a `scatter_add_` or a CSR product for the sums (`assign_accumulate`). Features are one tensor or a
re-iterable of per-file arrays (a list of memory-mapped `np.load(..., mmap_mode="r")` arrays, say):
they are read in fixed-size chunks of the concatenated frames, so memory is bounded by a chunk and
a tensor and the same frames split into files give the same centroids, bit for bit. Per pass,
one chunk at a time: nearest centroid, per-centroid sums and counts (accumulated in fp64), the
inertia, and the farthest frames (for re-seeding empty clusters, as scikit-learn does: an empty
cluster takes the frame farthest from its centroid, which leaves its old cluster).

Subsamples, drawn reproducibly from `seed` and the total frame count alone: `max_frames` (fit on
that many frames, gathered in memory; FAISS advises at most ~256 per centroid) and `init_frames`
(the k-means++ seeding runs on these; default 256 x k, all frames when fewer).

Conventions follow scikit-learn's `KMeans(algorithm="lloyd")`: an iteration is an assignment then
a centroid update, iterations stop early at a fixed point (the centroids do not move), and
`inertia_` is the sum of squared distances of the frames to the nearest final centroid.

`merge_runs(units)` turns frame units into runs (unit, duration in frames); `expand_runs` inverts it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from spidr_fast import kernels
from spidr_fast.kernels import codebook as codebook_kernels
from spidr_fast.metrics import run_starts

# precision -> (tl.dot input precision of the kernels, working dtype); fp64 runs the references
PRECISIONS: dict[str, tuple[str, torch.dtype]] = {
    "fp32": ("ieee", torch.float32),
    "tf32x3": ("tf32x3", torch.float32),
    "tf32": ("tf32", torch.float32),
    "fp64": ("ieee", torch.float64),
}
FORMAT = "spidr_fast.kmeans"
INIT_FRAMES_PER_CENTROID = 256

Features = Tensor | np.ndarray | Iterable[Tensor | np.ndarray]


class KMeans:
    """k-means with k-means++ seeding and Lloyd iterations on `spidr_fast.kernels`.

    Args:
        k: number of centroids.
        iters: at most this many Lloyd iterations (fewer when a fixed point is reached).
        seed: every random draw (subsamples, seeding) is a function of it.
        device: where the arithmetic runs (default: CUDA when available); features stay where they are
            and move there a chunk at a time.
        precision: "fp32" (default), "fp64", or on a GPU "tf32x3" / "tf32" (the assignment's tensor-core
            precision, see `kernels.codebook_assign`).
        init: "k-means++" or a (k, dim) tensor of initial centroids.
        n_init: k-means++ seedings, each followed by its Lloyd iterations; the lowest inertia wins
            (as scikit-learn's `n_init`; each costs `iters` passes over the frames).
        max_frames: fit on a random subsample of this many frames (None: every frame, streamed).
        init_frames: k-means++ runs on a random subsample of this many frames (default 256 x k).
        chunk_frames: frames per chunk (default: 2**17 on CUDA; about 2**22 / k, at least 1024, on CPU,
            where the references hold (chunk, k) distances).

    After `fit`: `cluster_centers_` (k, dim) on the CPU, `inertia_`, `n_iter_`, `history_` (the
    inertia at each iteration's assignment, then the final centroids' unless at a fixed point).
    """

    def __init__(
        self,
        k: int,
        *,
        iters: int = 100,
        seed: int = 0,
        device: str | torch.device | None = None,
        precision: str = "fp32",
        init: str | Tensor = "k-means++",
        n_init: int = 1,
        max_frames: int | None = None,
        init_frames: int | None = None,
        chunk_frames: int | None = None,
    ) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if iters < 0:
            raise ValueError(f"iters must be >= 0, got {iters}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
        if isinstance(init, str) and init != "k-means++":
            raise ValueError(f"init must be 'k-means++' or a (k, dim) tensor, got {init!r}")
        if n_init < 1:
            raise ValueError(f"n_init must be >= 1, got {n_init}")
        for name, value in (("max_frames", max_frames), ("init_frames", init_frames), ("chunk_frames", chunk_frames)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.k, self.iters, self.seed, self.precision, self.init = k, iters, seed, precision, init
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.n_init, self.max_frames, self.init_frames, self.chunk_frames = (
            n_init,
            max_frames,
            init_frames,
            chunk_frames,
        )
        self.cluster_centers_: Tensor | None = None
        self.inertia_: float | None = None
        self.n_iter_ = 0
        self.history_: list[float] = []

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision][1]

    def _chunk(self) -> int:
        if self.chunk_frames is not None:
            return self.chunk_frames
        if self.device.type == "cuda":
            return 1 << 17
        return min(1 << 16, max(1024, (1 << 22) // self.k))

    # ------------------------------------------------------------------ fitting
    def fit(self, features: Features, progress: Callable[[int, float], None] | None = None) -> KMeans:
        """Fit the centroids.

        Args:
            features: a (frames, dim) tensor or array, or a re-iterable (a list, not a generator) of
                per-file (frames, dim) arrays or tensors; it is read once per iteration.
            progress: called as progress(iteration, inertia) after each iteration's assignment.
        """
        data = _Frames(features, self._chunk())
        rng = np.random.default_rng(self.seed)
        if self.max_frames is not None and data.num_frames > self.max_frames:
            data = _Frames(data.gather(_sample(rng, data.num_frames, self.max_frames)), self._chunk())
        if data.num_frames < self.k:
            raise ValueError(f"k-means with k={self.k} needs at least {self.k} frames, got {data.num_frames}")
        best: tuple[Tensor, list[float], int] | None = None
        for _ in range(1 if isinstance(self.init, Tensor) else self.n_init):
            run = self._lloyd(data, self._initial_centers(data, rng), progress)
            if best is None or run[1][-1] < best[1][-1]:
                best = run
        centers, history, self.n_iter_ = best
        self.cluster_centers_, self.inertia_, self.history_ = centers.cpu(), history[-1], history
        return self

    def _lloyd(
        self, data: _Frames, centers: Tensor, progress: Callable[[int, float], None] | None
    ) -> tuple[Tensor, list[float], int]:
        """Lloyd iterations from `centers`: (final centroids, inertia per iteration then final, iterations)."""
        history: list[float] = []
        n_iter = 0
        for n_iter in range(1, self.iters + 1):
            stats = self._pass(data, centers)
            history.append(stats.inertia)
            if progress is not None:
                progress(n_iter, stats.inertia)
            new = stats.update(centers)
            if torch.equal(new, centers):  # a fixed point: the same assignment again
                return centers, history, n_iter
            centers = new
        history.append(self._pass(data, centers).inertia)  # the final centroids' inertia
        return centers, history, n_iter

    def _initial_centers(self, data: _Frames, rng: np.random.Generator) -> Tensor:
        if isinstance(self.init, Tensor):
            if self.init.shape != (self.k, data.dim):
                raise ValueError(f"init must be (k, dim) = ({self.k}, {data.dim}), got {tuple(self.init.shape)}")
            return self.init.to(self.device, self.dtype)
        wanted = self.init_frames or INIT_FRAMES_PER_CENTROID * self.k
        sample = data.gather(_sample(rng, data.num_frames, wanted)) if data.num_frames > wanted else data.all()
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        return kmeans_plusplus(sample.to(self.device, self.dtype), self.k, generator)

    @torch.no_grad()
    def _pass(self, data: _Frames, centers: Tensor) -> _PassStats:
        """One assignment over every chunk: fp64 sums, counts and inertia, and the k farthest frames."""
        stats = _PassStats(self.k, data.dim, self.device)
        for chunk in data.chunks():
            x = chunk.to(self.device, self.dtype)
            labels, counts, sums = assign_accumulate(x, centers, self.precision)
            d2 = (x - centers[labels]).square().sum(1)  # (n,) squared distance to the nearest centroid
            stats.add(x, labels, counts, sums, d2)
        return stats.finish()

    # ------------------------------------------------------------------ using
    @torch.no_grad()
    def predict(self, x: Tensor | np.ndarray) -> Tensor | np.ndarray:
        """Nearest centroid of each frame of x (frames, dim): int64 labels, a tensor on x's device (an
        array for an array input)."""
        centers = self._fitted()
        as_numpy = isinstance(x, np.ndarray)
        t = _as_tensor(x, "x")
        if t.shape[1] != centers.shape[1]:
            raise ValueError(f"x must be (frames, {centers.shape[1]}), got {tuple(t.shape)}")
        centers = centers.to(self.device, self.dtype)
        step = self._chunk()
        parts = [assign(t[s : s + step].to(self.device, self.dtype), centers, self.precision)
                 for s in range(0, t.shape[0], step)]  # fmt: skip
        labels = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device=self.device)
        return labels.cpu().numpy() if as_numpy else labels.to(t.device)

    def _fitted(self) -> Tensor:
        if self.cluster_centers_ is None:
            raise RuntimeError("KMeans is not fitted: call fit() or KMeans.load(path) first")
        return self.cluster_centers_

    def save(self, path: str | Path) -> Path:
        """Write the centroids and settings to `path` (torch.save, atomically: temp file + rename)."""
        from spidr_fast.io import atomic_write

        state = {
            "format": FORMAT,
            "version": 1,
            "centroids": self._fitted().contiguous(),
            "inertia": self.inertia_,
            "n_iter": self.n_iter_,
            "history": self.history_,
            "settings": {"k": self.k, "iters": self.iters, "seed": self.seed, "precision": self.precision},
        }
        path = Path(path)
        atomic_write(path, lambda tmp: torch.save(state, tmp))
        return path

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device | None = None) -> KMeans:
        """A fitted KMeans from a file written by `save` (clear error on anything else)."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: not a k-means file written by KMeans.save ({type(e).__name__}: {e})") from e
        if not isinstance(state, dict) or state.get("format") != FORMAT or "centroids" not in state:
            raise ValueError(f"{path}: not a k-means file written by KMeans.save (no {FORMAT!r} format tag)")
        centroids: Tensor = state["centroids"]
        settings = state["settings"]
        model = cls(centroids.shape[0], iters=settings["iters"], seed=settings["seed"], device=device,
                    precision=settings["precision"])  # fmt: skip
        model.cluster_centers_, model.inertia_ = centroids, state["inertia"]
        model.n_iter_, model.history_ = state["n_iter"], list(state["history"])
        return model


def assign(x: Tensor, centers: Tensor, precision: str = "fp32") -> Tensor:
    """Nearest centroid of each frame: x (n, D), centers (K, D) -> labels (n,) int64, ties to the lowest index.

    CUDA: `kernels.codebook_assign` (the fused kernel). Elsewhere, and in fp64: argmin over k of
    ||c_k||^2 - 2 x.c_k as one GEMM (the kernel's arithmetic; the codebook reference's `cdist`
    computes the same distances at twice the cost: 560 vs 275 ms for 8k x 768 frames, K = 500, on 2
    CPU threads).
    """
    if codebook_kernels.codebook_fused(x):
        ones = torch.ones(centers.shape[0], device=x.device, dtype=x.dtype)
        return kernels.codebook_assign(x, centers, ones, precision=PRECISIONS[precision][0])
    return torch.addmm(centers.square().sum(1), x, centers.T, alpha=-2).argmin(1)


def assign_accumulate(x: Tensor, centers: Tensor, precision: str = "fp32") -> tuple[Tensor, Tensor, Tensor]:
    """Labels (n,), counts (K,) and per-centroid sums (K, D) of x (n, D) for one Lloyd step.

    CUDA: `kernels.codebook_assign_accumulate` (fused assignment, reproducible segment sums).
    Elsewhere: `assign`, then a `scatter_add_` on one thread, `segment_sums` (a CSR product, the same
    bits) on several (the codebook reference's one-hot GEMM, kept there for bitwise parity with the
    `spidr` package, costs 210 ms for 8k x 768 frames, K = 500; these 6-66 ms).
    """
    if codebook_kernels.codebook_fused(x):
        ones = torch.ones(centers.shape[0], device=x.device, dtype=x.dtype)
        return kernels.codebook_assign_accumulate(x, centers, ones, precision=PRECISIONS[precision][0])
    labels = assign(x, centers, precision)
    counts = torch.bincount(labels, minlength=centers.shape[0])
    if torch.get_num_threads() == 1:  # the fastest there (the same bits either way)
        return labels, counts, torch.zeros_like(centers).scatter_add_(0, labels[:, None].expand(-1, x.shape[1]), x)
    return labels, counts, segment_sums(x, labels, counts)


def segment_sums(x: Tensor, labels: Tensor, counts: Tensor) -> Tensor:
    """Per-label sums (K, D) of x (n, D) on the CPU: a CSR (K, n) 0/1 matrix, rows listing their frames
    in order (a stable sort), times x; each sum adds its frames in frame order, as a `scatter_add_`
    does (the same bits). On 2 loaded CPU threads, 8k x 768 frames, K = 500, its slow calls take
    66-92 ms (p90, max) where `scatter_add_` and `index_add_` take 250-336 ms (their OpenMP threads
    wait on each other): Lloyd iterations 0.198-0.249 it/s against 0.171-0.230 (4 interleaved runs
    each). On 1 thread `scatter_add_` ran the faster (0.397-0.416 against 0.375-0.380 it/s), so
    `assign_accumulate` keeps it there (`bench/results/kmeans_throughput_cpu.md`)."""
    order = torch.sort(labels, stable=True).indices
    rows = torch.zeros(counts.shape[0] + 1, dtype=torch.int64, device=x.device)
    rows[1:] = counts.cumsum(0)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the product is all this uses
        warnings.simplefilter("ignore", UserWarning)
        onehot = torch.sparse_csr_tensor(
            rows, order, torch.ones_like(order, dtype=x.dtype), (counts.shape[0], x.shape[0])
        )
        return onehot @ x


def kmeans_plusplus(x: Tensor, k: int, generator: torch.Generator, trials: int | None = None) -> Tensor:
    """k-means++ seeding (greedy, as scikit-learn: each step draws `trials` candidates, default
    2 + ln k, with probability proportional to D(x)^2 and keeps the one lowering the potential most).

    Args:
        x: (N, D) frames, N >= k; the result is on x's device, in x's dtype.
        generator: a CPU generator (the draws are the same on every device).
    Returns:
        (k, D) centroids, rows of x.
    """
    n = x.shape[0]
    trials = trials or 2 + int(math.log(k))
    norms = x.square().sum(1)  # (N,)

    def sqdist(idx: Tensor) -> Tensor:  # (N, len(idx)) squared distances to x[idx], clamped at 0
        c = x[idx]
        return (norms[:, None] - 2 * x @ c.T + norms[idx][None, :]).clamp_min_(0)

    first = torch.randint(n, (1,), generator=generator).to(x.device)
    chosen = [first]
    closest = sqdist(first)[:, 0]  # (N,)
    for _ in range(1, k):
        potential = closest.sum()
        draws = torch.rand(trials, generator=generator, dtype=torch.float64).to(x.device) * potential.double()
        cand = torch.searchsorted(closest.double().cumsum(0), draws).clamp_(max=n - 1)
        d = torch.minimum(closest[:, None], sqdist(cand))  # (N, trials)
        best = d.sum(0).argmin()
        closest = d[:, best]
        chosen.append(cand[best : best + 1])
    return x[torch.cat(chosen)].clone()


# ---------------------------------------------------------------- passes over the frames
class _PassStats:
    """What one assignment pass accumulates (fp64 sums and counts on the device)."""

    def __init__(self, k: int, dim: int, device: torch.device) -> None:
        self.k = k
        self.counts = torch.zeros(k, dtype=torch.float64, device=device)
        self.sums = torch.zeros(k, dim, dtype=torch.float64, device=device)
        self.inertia_t = torch.zeros((), dtype=torch.float64, device=device)
        self.far_d2 = torch.zeros(0, dtype=torch.float64, device=device)  # the k farthest frames so far
        self.far_x = torch.zeros(0, dim, dtype=torch.float64, device=device)
        self.far_label = torch.zeros(0, dtype=torch.int64, device=device)
        self.inertia = math.nan

    def add(self, x: Tensor, labels: Tensor, counts: Tensor, sums: Tensor, d2: Tensor) -> None:
        self.counts += counts
        self.sums += sums
        self.inertia_t += d2.sum(dtype=torch.float64)
        top = d2.topk(min(self.k, d2.shape[0])).indices
        d2s = torch.cat([self.far_d2, d2[top].double()])
        keep = d2s.topk(min(self.k, d2s.shape[0])).indices
        self.far_d2 = d2s[keep]
        self.far_x = torch.cat([self.far_x, x[top].double()])[keep]
        self.far_label = torch.cat([self.far_label, labels[top]])[keep]

    def finish(self) -> _PassStats:
        self.inertia = self.inertia_t.item()
        if not math.isfinite(self.inertia):
            raise ValueError("the features hold NaN or Inf values (the k-means inertia is not finite)")
        return self

    def update(self, centers: Tensor) -> Tensor:
        """New centroids (sums / counts); an empty cluster takes the farthest remaining frame, which
        leaves its old cluster (scikit-learn's relocation)."""
        counts, sums = self.counts.clone(), self.sums.clone()
        empty = (counts == 0).nonzero().flatten().tolist()
        for j, i in zip(empty, range(self.far_d2.shape[0])):  # farthest first (topk is sorted)
            old = self.far_label[i]
            sums[old] -= self.far_x[i]
            counts[old] -= 1
            sums[j], counts[j] = self.far_x[i], 1
        new = sums / counts.clamp_min(1)[:, None]
        new = torch.where(counts[:, None] > 0, new, centers.double())  # only when frames < empty clusters
        return new.to(centers.dtype)


class _Frames:
    """The frames of a tensor or of a re-iterable of per-file arrays, in chunks of `chunk` rows of
    their concatenation (the same chunks whatever the file boundaries)."""

    def __init__(self, features: Features, chunk: int) -> None:
        self.chunk = chunk
        if isinstance(features, (Tensor, np.ndarray)):
            self.tensor: Tensor | None = _as_tensor(features, "features")
            self.files: Iterable[Any] = ()
            self.lengths = [self.tensor.shape[0]]
            self.dim = self.tensor.shape[1]
        else:
            if iter(features) is features:
                raise TypeError(
                    "features must be a tensor or a re-iterable of per-file arrays (a list, or an object whose "
                    "__iter__ starts over), not a one-shot iterator or generator: k-means reads them once an iteration"
                )
            self.tensor, self.files = None, features
            shapes = [_shape(a, f"features[{i}]") for i, a in enumerate(features)]
            dims = {d for _, d in shapes}
            if len(dims) > 1:
                raise ValueError(f"features: the files have different dims {sorted(dims)}")
            self.lengths = [n for n, _ in shapes]
            self.dim = dims.pop() if dims else 0
        self.num_frames = sum(self.lengths)

    def _pieces(self) -> Iterator[Tensor | np.ndarray]:
        """Each file as given (a memory-mapped array stays mapped until rows of it are taken)."""
        if self.tensor is not None:
            yield self.tensor
            return
        for i, a in enumerate(self.files):
            _check_float(a, f"features[{i}]")
            yield a

    def chunks(self) -> Iterator[Tensor]:
        if self.tensor is not None:  # views, no copy
            yield from self.tensor.split(self.chunk)
            return
        buf: list[Tensor] = []
        have = 0
        for a in self._pieces():
            start, n = 0, a.shape[0]
            while start < n:
                take = min(self.chunk - have, n - start)
                buf.append(_rows(a, slice(start, start + take)))
                have, start = have + take, start + take
                if have == self.chunk:
                    yield torch.cat(buf)
                    buf, have = [], 0
        if have:
            yield torch.cat(buf)

    def gather(self, index: np.ndarray) -> Tensor:
        """Rows `index` (sorted, global frame numbers) of the concatenation, in memory."""
        out, offset = [], 0
        for a in self._pieces():
            lo, hi = np.searchsorted(index, [offset, offset + a.shape[0]])
            if hi > lo:
                out.append(_rows(a, index[lo:hi] - offset))
            offset += a.shape[0]
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    def all(self) -> Tensor:
        if self.tensor is not None:
            return self.tensor
        return torch.cat([_rows(a, slice(None)) for a in self._pieces()])


def _sample(rng: np.random.Generator, n: int, m: int) -> np.ndarray:
    """m distinct frame numbers of n, sorted (a function of the generator's state, n and m)."""
    return np.sort(rng.choice(n, size=m, replace=False))


def _shape(a: Any, name: str) -> tuple[int, int]:
    shape = tuple(a.shape) if hasattr(a, "shape") else ()
    if len(shape) != 2:
        raise ValueError(f"{name}: must be (frames, dim), got shape {shape}")
    return shape[0], shape[1]


def _check_float(a: Tensor | np.ndarray, name: str) -> None:
    _shape(a, name)
    if not (a.is_floating_point() if isinstance(a, Tensor) else np.issubdtype(a.dtype, np.floating)):
        raise ValueError(f"{name}: features must be floating point, got {a.dtype}")


def _as_tensor(a: Tensor | np.ndarray, name: str) -> Tensor:
    _check_float(a, name)
    return _rows(a, slice(None))


def _rows(a: Tensor | np.ndarray, rows: slice | np.ndarray) -> Tensor:
    """Rows of a tensor or array as a tensor (a read-only array, e.g. a memmap, is copied)."""
    if isinstance(a, Tensor):
        return a[rows] if isinstance(rows, slice) else a[torch.from_numpy(rows)]
    part = a[rows]
    return torch.from_numpy(np.array(part) if not part.flags.writeable else np.ascontiguousarray(part))


# ---------------------------------------------------------------- merged units
def merge_runs(units: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs of repeated units: (units of the runs, durations in frames), both int64 (runs,).

    `expand_runs(*merge_runs(u))` gives back u; the durations sum to len(u).
    """
    u = np.asarray(units.cpu() if isinstance(units, Tensor) else units)
    if u.ndim != 1:
        raise ValueError(f"units must be 1-D (frames,), got shape {u.shape}")
    starts = run_starts(u)
    durations = np.diff(np.append(starts, u.size))
    return u[starts].astype(np.int64), durations.astype(np.int64)


def expand_runs(units: Tensor | np.ndarray, durations: Tensor | np.ndarray) -> np.ndarray:
    """Frame units from runs: each unit repeated its duration (the inverse of `merge_runs`)."""
    u, d = np.asarray(units), np.asarray(durations)
    if u.shape != d.shape or u.ndim != 1:
        raise ValueError(f"units and durations must be 1-D of one length, got {u.shape} and {d.shape}")
    if (d < 1).any():
        raise ValueError("durations must be >= 1 frame")
    return np.repeat(u.astype(np.int64), d)
