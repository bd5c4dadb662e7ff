"""What every benchmark result carries: the machine, the software versions, the commit; and a writer."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spidr_fast import devices

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


@contextlib.contextmanager
def environ(**values: str | None) -> Iterator[None]:
    """Set these environment variables (None: unset) for the block, then restore what was there."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v


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


def skip_unless_runnable(provider: str, device: str) -> None:
    """Skip the calling benchmark where its provider cannot run: Triton providers run on CUDA, or on CPU under
    the interpreter (`triton` itself only; its variants, e.g. `triton_tf32x3`, are GPU-only)."""
    import pytest

    from spidr_fast.kernels._dispatch import interpreter_on, triton_available

    if provider.startswith("triton"):
        if not triton_available() or (device == "cpu" and not interpreter_on()):
            pytest.skip("Triton needs a GPU (or TRITON_INTERPRET=1 on CPU)")
        if device == "cpu" and provider != "triton":
            pytest.skip("GPU-only variant")


def device_peaks(name: str) -> dict[str, float] | None:
    """Datasheet peaks (dense; TFLOP/s and GB/s) of a device name, from `spidr_fast.devices` (None when
    unknown: no %-of-peak is reported then). Leads, not measurements: `bench/gpu_env.py --kernels`
    measures the achieved bf16 GEMM and copy ceilings too."""
    d = devices.lookup(name)
    if d is None:
        return None
    return {"bf16_tflops": d.bf16 / 1e12, "tf32_tflops": d.tf32 / 1e12, "fp32_tflops": d.fp32 / 1e12,
            "hbm_gbs": d.hbm / 1e9}  # fmt: skip


def librispeech_like_lengths(num: int, seed: int = 0, sample_rate: int = 16_000) -> np.ndarray:
    """Synthetic utterance lengths (samples) shaped like LibriSpeech train (2-35 s, mean ~13 s).

    A rough mixture, not LibriSpeech itself: 60% near the segmenter's usual ~14.5 s (normal, sd 1.5),
    35% uniform in 2-17 s, 5% uniform in 17-35 s.
    """
    rng = np.random.default_rng(seed)
    which = rng.random(num)
    seconds = np.where(
        which < 0.6,
        rng.normal(14.5, 1.5, num),
        np.where(which < 0.95, rng.uniform(2, 17, num), rng.uniform(17, 35, num)),
    )
    return (np.clip(seconds, 2, 35) * sample_rate).astype(np.int64)
