"""Build assign.cpp (pybind11 + OpenMP, no torch headers) in a temp folder and time it against PyTorch.

    python bench/experiments/cpu_codebook/run.py [--march native|x86-64]

Paths compared, labels (C, N) for C=8, N=4096, K=256, D=768 fp32:
- ref: the model's CPU reference, cdist(x, codebook / counts).argmin (what the reference package does);
- addmm: argmin_k ||c_k||^2 - 2 x.c_k with one batched GEMM (torch.baddbmm);
- cpp: the fused loop of assign.cpp (4 frames share each codeword load, omp simd dot products).
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from spidr_fast.kernels.codebook import codebook_assign_ref


def build(march: str, folder: Path) -> object:
    import pybind11

    out = folder / ("cpu_assign" + sysconfig.get_config_var("EXT_SUFFIX"))
    cmd = ["g++", "-O3", f"-march={march}", "-fopenmp", "-shared", "-fPIC", "-std=c++17",
           f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
           str(Path(__file__).with_name("assign.cpp")), "-o", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True)
    spec = importlib.util.spec_from_file_location("cpu_assign", out)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def best_of(f, repeats: int = 5) -> float:
    f()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--march", default="x86-64")
    args = parser.parse_args()
    C, N, K, D = 8, 4096, 256, 768
    torch.manual_seed(0)
    x = torch.randn(C, N, D)
    counts = torch.rand(C, K) * 3 + 0.5
    codebook = torch.randn(C, K, D) * counts.unsqueeze(-1)
    centers = (codebook / counts.unsqueeze(-1)).contiguous()
    with tempfile.TemporaryDirectory() as tmp:
        cpp = build(args.march, Path(tmp))
        paths = {
            "ref": lambda: codebook_assign_ref(x, codebook, counts),
            "addmm": lambda: torch.baddbmm(
                centers.square().sum(-1).unsqueeze(1), x, centers.transpose(1, 2), alpha=-2
            ).argmin(-1),
            "cpp": lambda: torch.from_numpy(cpp.assign(x.numpy(), centers.numpy())),
        }
        ref = paths["ref"]()
        for name, f in paths.items():
            t = best_of(f)
            same = (f() == ref).float().mean().item()
            gflops = 2 * C * N * K * D / t / 1e9
            print(f"{name:>6}: {t * 1e3:7.1f} ms  {gflops:6.1f} GFLOP/s  labels equal to ref: {same:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
