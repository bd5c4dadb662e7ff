"""Per-centroid sums of one k-means chunk on the CPU: `scatter_add_`, `index_add_` and a CSR product.

The three give the same bits (each sum adds its frames in frame order); this times them on one
chunk of `spidr_fast.units.KMeans` (8192 frames x 768, K = 500), interleaved, 60 rounds, and prints
median / p90 / max per method (`spidr_fast.units.assign_accumulate` picks by thread count).

    python bench/kmeans_sums.py --threads 1
    python bench/kmeans_sums.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from spidr_fast.units import segment_sums


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", UserWarning)
    g = torch.Generator().manual_seed(0)
    n, d, k = 8192, 768, 500
    x, labels = torch.randn(n, d, generator=g), torch.randint(0, k, (n,), generator=g)
    counts = torch.bincount(labels, minlength=k)
    methods = {
        "scatter_add_": lambda: torch.zeros(k, d).scatter_add_(0, labels[:, None].expand(-1, d), x),
        "index_add_": lambda: torch.zeros(k, d).index_add_(0, labels, x),
        "CSR product (segment_sums)": lambda: segment_sums(x, labels, counts),
    }
    want = methods["scatter_add_"]()
    assert all(torch.equal(f(), want) for f in methods.values())
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.rounds):
        for name, f in methods.items():
            start = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - start)
    for name, t in times.items():
        t.sort()
        print(
            f"threads {args.threads} {name:28s} median {1e3 * statistics.median(t):7.2f} ms  "
            f"p90 {1e3 * t[int(0.9 * len(t))]:7.2f} ms  max {1e3 * t[-1]:7.2f} ms"
        )


if __name__ == "__main__":
    main()
