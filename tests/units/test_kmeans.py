"""spidr_fast.units.KMeans against scikit-learn's KMeans, streaming against in-memory, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spidr_fast.units import KMeans
from tests.units.conftest import blobs

sklearn_cluster = pytest.importorskip("sklearn.cluster")


def sk_best_of_3(x: np.ndarray, k: int) -> float:
    return min(
        sklearn_cluster.KMeans(k, n_init=1, random_state=s, algorithm="lloyd").fit(x).inertia_ for s in range(3)
    )


@pytest.mark.parametrize("k", [1, 5, 9])
def test_same_init_gives_sklearn_labels_and_inertia_fp64(k):
    x = blobs()
    init = x[np.random.default_rng(1).choice(len(x), k, replace=False)]
    theirs = sklearn_cluster.KMeans(k, init=init, n_init=1, max_iter=30, tol=0, algorithm="lloyd").fit(x)
    ours = KMeans(k, iters=30, init=torch.from_numpy(init), precision="fp64", device="cpu").fit(torch.from_numpy(x))
    assert ours.n_iter_ == theirs.n_iter_
    assert np.array_equal(ours.predict(x), theirs.labels_)
    assert ours.inertia_ == pytest.approx(theirs.inertia_, rel=1e-5)
    np.testing.assert_allclose(ours.cluster_centers_.numpy(), theirs.cluster_centers_, rtol=1e-9, atol=1e-9)


def test_same_init_few_iterations_matches_sklearn_before_convergence():
    """Stopped after 2 iterations (no fixed point yet): the inertia is the final centroids', as sklearn's."""
    x = blobs(seed=4, std=4.0)
    init = x[:7]
    theirs = sklearn_cluster.KMeans(7, init=init, n_init=1, max_iter=2, tol=0, algorithm="lloyd").fit(x)
    ours = KMeans(7, iters=2, init=torch.from_numpy(init), precision="fp64", device="cpu").fit(x)
    assert np.array_equal(ours.predict(x), theirs.labels_)
    assert ours.inertia_ == pytest.approx(theirs.inertia_, rel=1e-5)


@pytest.mark.parametrize("precision", ["fp64", "fp32"])
@pytest.mark.parametrize("k", [6, 15])
def test_kmeans_plus_plus_within_1_percent_of_sklearn_on_blobs(k, precision):
    x = blobs(n=2000, centers=6, dim=16, seed=2, std=2.0)
    ours = KMeans(k, iters=100, n_init=3, precision=precision, device="cpu").fit(x)
    best = sk_best_of_3(x, k)
    print(f"k={k} {precision}: ours {ours.inertia_:.6g}, sklearn best of 3 {best:.6g}")
    assert ours.inertia_ <= 1.01 * best


def test_kmeans_plus_plus_within_1_percent_of_sklearn_on_model_features(model_features):
    x = np.concatenate(list(model_features.values())).astype(np.float64)
    ours = KMeans(16, iters=100, n_init=3, precision="fp64", device="cpu").fit(x)
    best = sk_best_of_3(x, 16)
    print(f"{len(x)} frames: ours {ours.inertia_:.6g}, sklearn best of 3 {best:.6g}")
    assert ours.inertia_ <= 1.01 * best


def test_streaming_equals_in_memory(model_features):
    """Per-file arrays (read in chunks across file boundaries) give the tensor's centroids bit for bit."""
    files = list(model_features.values())
    kw = {"iters": 10, "seed": 3, "device": "cpu", "chunk_frames": 100}
    in_memory = KMeans(12, **kw).fit(torch.from_numpy(np.concatenate(files)))
    streamed = KMeans(12, **kw).fit(files)
    assert torch.equal(streamed.cluster_centers_, in_memory.cluster_centers_)
    assert streamed.history_ == in_memory.history_
    # a subsample too: drawn from the frame count and the seed, wherever the frames come from
    sub = {"max_frames": 150, "init_frames": 60}
    assert torch.equal(
        KMeans(12, **kw, **sub).fit(files).cluster_centers_,
        KMeans(12, **kw, **sub).fit(np.concatenate(files)).cluster_centers_,
    )


def test_streaming_reads_memory_mapped_files(tmp_path, model_features):
    paths = []
    for i, a in enumerate(model_features.values()):
        np.save(tmp_path / f"{i}.npy", a)
        paths.append(tmp_path / f"{i}.npy")
    mapped = [np.load(p, mmap_mode="r") for p in paths]
    kw = {"iters": 5, "device": "cpu", "chunk_frames": 64}
    assert torch.equal(
        KMeans(8, **kw).fit(mapped).cluster_centers_,
        KMeans(8, **kw).fit(list(model_features.values())).cluster_centers_,
    )


def test_max_frames_subsample_is_reproducible_and_used():
    x = blobs(n=3000)
    a = KMeans(4, iters=5, max_frames=500, seed=7, device="cpu").fit(x)
    b = KMeans(4, iters=5, max_frames=500, seed=7, device="cpu").fit(x)
    c = KMeans(4, iters=5, max_frames=500, seed=8, device="cpu").fit(x)
    assert torch.equal(a.cluster_centers_, b.cluster_centers_)
    assert not torch.equal(a.cluster_centers_, c.cluster_centers_)
    # the fit saw 500 frames: its inertia is that of 500 frames, far below the 3000-frame one
    full = ((x - a.cluster_centers_.numpy()[a.predict(x)]) ** 2).sum()
    assert a.inertia_ < 0.3 * full


def test_empty_cluster_is_reseeded_with_the_farthest_frame():
    """Two centroids start on top of each other: the second gets no frame and takes the farthest one."""
    x = np.array([[0.0], [0.1], [0.2], [10.0]])
    init = torch.tensor([[0.1], [0.1]], dtype=torch.float64)
    ours = KMeans(2, iters=10, init=init, precision="fp64", device="cpu").fit(x)
    theirs = sklearn_cluster.KMeans(2, init=init.numpy(), n_init=1, max_iter=10, tol=0, algorithm="lloyd").fit(x)
    np.testing.assert_allclose(np.sort(ours.cluster_centers_.numpy(), 0), [[0.1], [10.0]])
    np.testing.assert_allclose(np.sort(theirs.cluster_centers_, 0), [[0.1], [10.0]])
    assert ours.inertia_ == pytest.approx(theirs.inertia_)


def test_save_load_roundtrip(tmp_path):
    x = blobs(n=400).astype(np.float32)
    model = KMeans(5, iters=8, device="cpu").fit(x)
    path = model.save(tmp_path / "km.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["km.pt"]  # no temp file left
    loaded = KMeans.load(path, device="cpu")
    assert torch.equal(loaded.cluster_centers_, model.cluster_centers_)
    assert loaded.inertia_ == model.inertia_ and loaded.precision == "fp32"
    assert np.array_equal(loaded.predict(x), model.predict(x))
    assert torch.equal(loaded.predict(torch.from_numpy(x)), torch.from_numpy(model.predict(x)))


def test_clear_errors(tmp_path):
    with pytest.raises(RuntimeError, match="not fitted"):
        KMeans(3).predict(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="at least 5 frames"):
        KMeans(5, device="cpu").fit(np.zeros((3, 2)))
    with pytest.raises(TypeError, match="one-shot iterator"):
        KMeans(2, device="cpu").fit(a for a in [np.zeros((3, 2))])
    with pytest.raises(ValueError, match=r"features\[1\]: must be \(frames, dim\)"):
        KMeans(2, device="cpu").fit([np.zeros((3, 2)), np.zeros(3)])
    with pytest.raises(ValueError, match="different dims"):
        KMeans(2, device="cpu").fit([np.zeros((3, 2)), np.zeros((3, 4))])
    with pytest.raises(ValueError, match="NaN or Inf"):
        KMeans(2, device="cpu").fit(np.array([[0.0], [1.0], [np.nan]]))
    with pytest.raises(ValueError, match="precision"):
        KMeans(2, precision="fp16")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"junk\.pt: not a k-means file"):
        KMeans.load(tmp_path / "junk.pt")
    torch.save({"a": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other\.pt: not a k-means file"):
        KMeans.load(tmp_path / "other.pt")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_sums_are_the_scatter_add_bits_on_any_thread_count(dtype):
    """`segment_sums` (the CSR product used on several CPU threads) gives scatter_add_'s bits, empty clusters
    included, so a fit's centroids do not depend on the thread count."""
    from spidr_fast.units import assign_accumulate, segment_sums

    g = torch.Generator().manual_seed(0)
    x, centers = torch.randn(3000, 24, generator=g, dtype=dtype), torch.randn(40, 24, generator=g, dtype=dtype)
    labels = torch.randint(0, 40, (3000,), generator=g)
    labels[labels == 7] = 8  # an empty cluster
    counts = torch.bincount(labels, minlength=40)
    want = torch.zeros_like(centers).scatter_add_(0, labels[:, None].expand(-1, 24), x)
    got = segment_sums(x, labels, counts)
    assert got.layout == torch.strided and got.dtype == dtype and torch.equal(got, want) and not got[7].any()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = assign_accumulate(x, centers)
        torch.set_num_threads(2)
        two = assign_accumulate(x, centers)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two))
