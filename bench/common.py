"""What every benchmark result carries: the machine, the software versions, the commit; and a writer."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).parent / "results"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        status = ["git", "status", "--porcelain", "--untracked-files=no"]
        dirty = subprocess.run(status, capture_output=True, text=True)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: torch.device) -> dict[str, Any]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = device.type == "cuda"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu {platform.machine()}",
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda if cuda else None,
        "python": platform.python_version(),
        "commit": git_commit(),
    }


def append_jsonl(path: str | Path, records: list[dict[str, Any]]) -> Path:
    """Append records as JSON lines (one write call per record; a crash leaves whole lines)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
    return path


def require_reference() -> None:
    """The side-by-side benchmarks need the reference package: fail with how to get it."""
    try:
        import spidr  # noqa: F401
    except ImportError:
        raise SystemExit(
            "the reference package `spidr` is not installed: `pip install --no-deps --ignore-requires-python "
            "spidr==0.2.0` (on a machine without network, carry its wheel: see bench/README.md)"
        ) from None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(benchmark, fn: Callable[[], object], device: str, *, bytes_moved: float = 0.0, flops: float = 0.0) -> None:
    """Time `fn` (CUDA synchronised inside the timed callable) and record peak memory, GB/s, TFLOP/s."""

    def timed() -> object:
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    on_gpu = device == "cuda"
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    benchmark.pedantic(timed, rounds=20 if on_gpu else 3, warmup_rounds=3 if on_gpu else 1, iterations=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(environment(torch.device(device)))
    benchmark.extra_info["median_ms"] = median * 1e3
    if on_gpu:
        benchmark.extra_info["peak_mem_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    if bytes_moved:
        benchmark.extra_info["GB/s"] = bytes_moved / median / 1e9
    if flops:
        benchmark.extra_info["TFLOP/s"] = flops / median / 1e12


# Datasheet peaks (dense; TFLOP/s and GB/s), first matching substring of the device name wins. Leads,
# not measurements: `bench/gpu_env.py --kernels` measures the achieved bf16 GEMM and copy ceilings too.
DEVICE_PEAKS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bf16_tflops": 756, "tf32_tflops": 378, "fp32_tflops": 51, "hbm_gbs": 2000}),
    ("H100 NVL", {"bf16_tflops": 835, "tf32_tflops": 418, "fp32_tflops": 60, "hbm_gbs": 3900}),
    ("GH200", {"bf16_tflops": 989, "tf32_tflops": 494, "fp32_tflops": 67, "hbm_gbs": 4000}),
    ("H200", {"bf16_tflops": 989, "tf32_tflops": 494, "fp32_tflops": 67, "hbm_gbs": 4800}),
    ("H100", {"bf16_tflops": 989, "tf32_tflops": 494, "fp32_tflops": 67, "hbm_gbs": 3350}),
    ("A100", {"bf16_tflops": 312, "tf32_tflops": 156, "fp32_tflops": 19.5, "hbm_gbs": 2039}),
    ("L40S", {"bf16_tflops": 362, "tf32_tflops": 183, "fp32_tflops": 91.6, "hbm_gbs": 864}),
    ("B200", {"bf16_tflops": 2250, "tf32_tflops": 1100, "fp32_tflops": 75, "hbm_gbs": 8000}),
]


def device_peaks(name: str) -> dict[str, float] | None:
    """Datasheet peaks for a device name (None when unknown: no %-of-peak is reported then)."""
    return next((dict(peaks) for key, peaks in DEVICE_PEAKS if key in name), None)
