"""Lloyd iterations per second: spidr_fast.units.KMeans against scikit-learn and FAISS (when installed).

Every implementation fits the same frames from the same initial centroids for a fixed number of
iterations (no early stop: random data, tolerance 0), in the same process, one after the other, on
the same thread count; iterations/s = iterations done / fit time (a fit is its iterations and one
final assignment, in each library). The inertia of each fit is recorded beside it as a sanity check
(the same iterations from the same start give nearly the same inertia).

    python bench/kmeans_throughput.py                       # 50k x 768, K = 500: minutes on a small CPU
    python bench/kmeans_throughput.py --size issue          # 1M x 768, K = 500 (issue 14's size; GPU)
    python bench/kmeans_throughput.py --device cuda --impls spidr_fast --precision tf32x3

Appends one JSON line per implementation to bench/results/kmeans_throughput.jsonl (--out).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, append_jsonl, environment

SIZES = {"cpu": (50_000, 768, 500), "issue": (1_000_000, 768, 500), "smoke": (2_000, 32, 16)}


def frames(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """(n, dim) fp32: 4k Gaussian blobs (layer features are clustered, not white noise)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(4000, dim, generator=g) * 2
    x = means[torch.randint(4000, (n,), generator=g)] + torch.randn(n, dim, generator=g)
    return x.numpy()


def run_spidr_fast(x: np.ndarray, init: np.ndarray, iters: int, args: argparse.Namespace) -> tuple[float, int, float]:
    from spidr_fast.units import KMeans

    device = torch.device(args.device)
    data = torch.from_numpy(x).to(device)  # the frames already on the device, as the other libraries have them
    model = KMeans(len(init), iters=iters, init=torch.from_numpy(init), device=device, precision=args.precision)
    if device.type == "cuda":  # warm-up: Triton compilation is not timed
        KMeans(len(init), iters=1, init=torch.from_numpy(init), device=device, precision=args.precision).fit(data)
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    model.fit(data)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, model.n_iter_, model.inertia_


def run_sklearn(x: np.ndarray, init: np.ndarray, iters: int, args: argparse.Namespace) -> tuple[float, int, float]:
    from sklearn.cluster import KMeans as SKMeans
    from threadpoolctl import threadpool_limits

    model = SKMeans(len(init), init=init, n_init=1, max_iter=iters, tol=0, algorithm="lloyd")
    with threadpool_limits(args.threads):
        start = time.perf_counter()
        model.fit(x)
    return time.perf_counter() - start, model.n_iter_, float(model.inertia_)


def run_faiss(x: np.ndarray, init: np.ndarray, iters: int, args: argparse.Namespace) -> tuple[float, int, float]:
    import faiss

    faiss.omp_set_num_threads(args.threads)
    k, d = init.shape
    # no subsampling (max_points_per_centroid), no tolerance: every iteration over every frame
    model = faiss.Kmeans(d, k, niter=iters, seed=0, max_points_per_centroid=len(x) // k + 1, verbose=False)
    start = time.perf_counter()
    model.train(x, init_centroids=init)
    seconds = time.perf_counter() - start
    dist, _ = model.index.search(x, 1)  # squared L2 to the nearest centroid: the final inertia (not timed)
    return seconds, iters, float(dist.sum())


IMPLS = {"spidr_fast": run_spidr_fast, "sklearn": run_sklearn, "faiss": run_faiss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu", help="frames x dim, K (default: cpu)")
    parser.add_argument("--frames", type=int, help="override the size's frame count")
    parser.add_argument("--k", type=int, help="override the size's K")
    parser.add_argument("--iters", type=int, default=5, help="Lloyd iterations per fit (default: 5)")
    parser.add_argument("--impls", default="spidr_fast,sklearn,faiss", help="comma-separated (default: all)")
    parser.add_argument("--device", default="cpu", help="spidr_fast's device (default: cpu)")
    parser.add_argument("--precision", default="fp32", help="spidr_fast's precision (default: fp32)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads for all")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "kmeans_throughput.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n, dim, k = SIZES[args.size]
    n, k = args.frames or n, args.k or k
    x = frames(n, dim)
    init = x[np.random.default_rng(0).choice(n, k, replace=False)].copy()
    env = environment(torch.device(args.device))
    records = []
    for name in args.impls.split(","):
        try:
            seconds, done, inertia = IMPLS[name](x, init, args.iters, args)
        except ImportError as e:
            print(f"{name}: skipped ({e})", flush=True)
            continue
        device = args.device if name == "spidr_fast" else "cpu"
        record = {
            "benchmark": "kmeans_throughput", "impl": name, "frames": n, "dim": dim, "k": k, "iterations": done,
            "seconds": seconds, "iterations_per_s": done / seconds, "inertia": inertia, "threads": args.threads,
            "impl_device": device, "precision": args.precision if name == "spidr_fast" else "fp32", **env,
        }  # fmt: skip
        records.append(record)
        print(f"{name:11s} {device:6s} {n} x {dim}, K={k}: {done} iterations in {seconds:.2f} s = "
              f"{done / seconds:.3f} it/s (inertia {inertia:.6g})", flush=True)  # fmt: skip
    append_jsonl(args.out, records)


if __name__ == "__main__":
    main()
