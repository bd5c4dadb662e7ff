"""`make gpu-check` stage 1: the machine, the software, and what the compiler made of every Triton kernel.

    python bench/gpu_env.py --out env.json                # versions, optional packages, GPU, clocks
    python bench/gpu_env.py --kernels --out kernels.json  # + registers/spills/shared memory (CUDA)

Environment: GPU name, capability, memory, SM count, clocks and driver (nvidia-smi when present),
torch / triton / CUDA / cuDNN / Python versions, and which optional packages import (the reference
`spidr` with its version and location, soundfile, flash-attn 2, flash-attn 4 (`flash_attn.cute`),
pytest-benchmark, pytest-xdist), so that `bench/gpu_check.py` can skip a stage and say why.

Kernel resources (`--kernels`, CUDA only): one bf16 training step of the base SpidR (forward,
backward) launches every fused kernel the model uses at real sizes; each compiled variant is then
read back from triton's JIT caches: registers, spills, shared memory, warps, stages. The offline
analysis of `bench/sm90.py` (kernels at the base shapes, the launchers' configs) is added
for this device's compute capability.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OPTIONAL = {
    "spidr": "the reference package (side-by-side training and extraction)",
    "soundfile": "audio decoding (extraction CLI, data pipeline)",
    "flash_attn": "flash-attn 2 (varlen attention backend)",
    "flash_attn.cute": "flash-attn 4 (CuTe DSL varlen attention backend, Hopper+)",
    "pytest_benchmark": "the kernel microbenchmarks",
    "xdist": "pytest-xdist (kernel tests in parallel)",
}
NVIDIA_SMI_FIELDS = (
    "name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,"
    "power.draw,power.limit,temperature.gpu,utilization.gpu,persistence_mode,compute_mode"
)


def package_info(name: str) -> dict[str, Any]:
    """Whether `name` imports, and from where (an import error is reported, never raised)."""
    try:
        module = importlib.import_module(name)
    except Exception as e:  # any failure (a missing native library, a CUDA-only import) means "not usable"
        return {"available": False, "error": f"{type(e).__name__}: {e}"[:300]}
    info: dict[str, Any] = {"available": True, "path": str(Path(getattr(module, "__file__", "") or "").parent)}
    version = getattr(module, "__version__", None)
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        version = version or importlib.metadata.version(name.split(".")[0].replace("_", "-"))
    info["version"] = version
    return info


def reference_info() -> dict[str, Any]:
    """The reference `spidr` as imported: version, location, and whether it is a source checkout."""
    info = package_info("spidr")
    if not info["available"]:
        return info
    checkout = os.environ.get("SPIDR_REFERENCE_PATH")
    info["source"] = "checkout" if checkout and info["path"].startswith(str(Path(checkout).resolve())) else "installed"
    if info["source"] == "checkout":
        info["checkout"] = checkout
        git = shutil.which("git")
        if git:
            out = subprocess.run(
                [git, "-C", checkout, "describe", "--always", "--dirty", "--tags"], capture_output=True
            )
            info["git"] = out.stdout.decode().strip() or None
    return info


def nvidia_smi() -> dict[str, str] | str:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return "nvidia-smi not found"
    cmd = [exe, f"--query-gpu={NVIDIA_SMI_FIELDS}", "--format=csv,noheader"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"nvidia-smi failed: {e}"
    if out.returncode != 0:
        return f"nvidia-smi failed: {out.stderr.strip()[:300]}"
    first = out.stdout.strip().splitlines()[0]
    return dict(zip(NVIDIA_SMI_FIELDS.split(","), (v.strip() for v in first.split(","))))


def environment() -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
        "packages": {name: package_info(name) for name in OPTIONAL if name != "spidr"},
        "reference": reference_info(),
    }
    env["packages"]["triton"] = package_info("triton")
    env["packages"]["spidr_fast"] = package_info("spidr_fast")
    if not env["cuda_available"]:
        env["no_cuda_reason"] = "torch.cuda.is_available() is False" + (
            " (a CPU build of torch)" if torch.version.cuda is None else ""
        )
        return env
    props = torch.cuda.get_device_properties(0)
    env["gpu"] = {
        "name": props.name,
        "count": torch.cuda.device_count(),
        "capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "multiprocessors": props.multi_processor_count,
        "l2_cache_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1) or None,
    }
    env["nvidia_smi"] = nvidia_smi()
    sys.path.insert(0, str(ROOT / "bench"))
    from common import device_peaks

    env["peaks"] = device_peaks(props.name)
    return env


# --------------------------------------------------------------------------------------------
# Kernel resources as compiled for this device
# --------------------------------------------------------------------------------------------


def jit_functions() -> dict[str, Any]:
    """ "module:kernel" -> the triton JITFunction of every spidr_fast kernel module (after launches)."""
    import pkgutil

    import spidr_fast.kernels as package

    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name in getattr(module, "KERNELS", ()):
            fn = getattr(module, name)
            found[f"{info.name}:{name}"] = getattr(fn, "fn", fn) if hasattr(fn, "configs") else fn  # autotuner
    return found


def compiled_variants(fn: Any) -> list[Any]:
    """Every CompiledKernel in a JITFunction's caches (triton 3.x keeps them per device; the tuple's
    layout changed between releases, so take any dict in it whose values look like compiled kernels)."""
    caches = []
    for value in list(getattr(fn, "device_caches", {}).values()):
        caches += [v for v in (value if isinstance(value, tuple) else (value,)) if isinstance(v, dict)]
    caches += list(getattr(fn, "cache", {}).values()) if isinstance(getattr(fn, "cache", None), dict) else []
    kernels = []
    for cache in caches:
        kernels += [k for k in cache.values() if hasattr(k, "metadata") and hasattr(k, "asm")]
    return kernels


def cubin_resources(cubin: bytes | None) -> tuple[int | None, int | None]:
    """(registers, stack bytes) of a cubin from `cuobjdump --dump-resource-usage`, or (None, None)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from sm90 import cuobjdump, resource_usage, triton_tools

    tools = triton_tools()
    if not cubin or isinstance(tools, str):
        return None, None
    fields = resource_usage(cuobjdump(cubin, tools, "--dump-resource-usage", check=False)[0])
    return (fields["REG"], fields["STACK"]) if fields else (None, None)


def describe_compiled(kernel: Any) -> dict[str, Any]:
    """Registers, spills, shared memory and launch configuration of one compiled kernel."""
    meta = kernel.metadata
    get = meta.get if isinstance(meta, dict) else lambda k, d=None: getattr(meta, k, d)
    if getattr(kernel, "n_regs", None) is None and hasattr(kernel, "_init_handles"):
        with contextlib.suppress(Exception):  # loads the module (needs the driver): fills n_regs / n_spills
            kernel._init_handles()
    constants = get("constants", None) or {}
    regs, spills = getattr(kernel, "n_regs", None), getattr(kernel, "n_spills", None)
    if regs is None:  # not loaded (no driver): read the cubin with triton's bundled cuobjdump
        regs, spills = cubin_resources(kernel.asm.get("cubin"))
    return {
        "name": get("name", None),
        "regs": regs,
        "spills": spills,
        "shared": get("shared", None),
        "num_warps": get("num_warps", None),
        "num_stages": get("num_stages", None),
        "constexprs": {str(k): v for k, v in dict(constants).items() if isinstance(v, (int, float, str, bool))},
    }


def launch_every_kernel(device: str = "cuda") -> None:
    """One bf16 step of the base SpidR (forward + backward) on 4 x 5 s: every fused kernel at real sizes."""
    import numpy as np
    import torch

    import spidr_fast
    from spidr_fast.data.batching import num_frames
    from spidr_fast.data.masks import compute_mask_indices

    torch.manual_seed(0)
    model = spidr_fast.SpidR(spidr_fast.SpidRConfig()).to(device).train()
    waveforms = torch.randn(4, 80_000, device=device)
    mask = compute_mask_indices((4, int(num_frames(80_000))), rng=np.random.default_rng(0))
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        losses, _ = model(waveforms, mask_indices=torch.from_numpy(mask).to(device))
    losses.float().mean().backward()
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_ceilings() -> dict[str, float]:
    """Achieved bf16 GEMM rate (8192^3, random data) and device-to-device copy bandwidth (2 GiB, bytes
    read + written): the ceilings the benchmarks' rates are best read against (METHOD.md's two numbers)."""
    import torch

    def median_ms(fn, reps: int = 10) -> float:
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(reps):
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]

    def gemm_tflops(n: int = 8192) -> float:
        a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        return 2 * n**3 / (median_ms(lambda: a @ b) * 1e-3) / 1e12

    def copy_gbs(numel: int = 2**29) -> float:  # 2 GiB of fp32
        src = torch.randn(numel, device="cuda")
        dst = torch.empty_like(src)
        return 2 * numel * 4 / (median_ms(lambda: dst.copy_(src)) * 1e-3) / 1e9

    gemm, copy = gemm_tflops(), copy_gbs()
    torch.cuda.empty_cache()
    return {"bf16_gemm_tflops": round(gemm, 1), "copy_gbs": round(copy, 1)}


def offline_resources(capability: int) -> list[dict[str, Any]] | str:
    """bench/sm90.py's offline compile of the codebook and heads kernels at the base shapes, with
    their launchers' configurations, for `capability` (90 for sm_90): a table, or why it could not run."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import sm90

        os.environ["SM90_CAPABILITY"] = str(capability)
        results = sm90.compile_base_shapes("codebook", "heads_ce")
    except Exception as e:
        return f"{type(e).__name__}: {e}"[:1000]
    if isinstance(results, str):
        return results
    return [
        {
            "kernel": name,
            **{k: r[k] for k in ("regs", "stack", "shared")},
            "tensor_core_ops_in_loops": sm90.tensor_core_ops(r["loop_counts"]),
            "config": {
                **r["spec"]["constexprs"],
                "num_warps": r["spec"]["num_warps"],
                "num_stages": r["spec"]["num_stages"],
            },
        }
        for name, r in results.items()
    ]


def kernel_resources() -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {}
    try:
        out["ceilings"] = measure_ceilings()
    except Exception as e:
        out["ceilings"] = f"{type(e).__name__}: {e}"[:500]
    try:
        launch_every_kernel()
        launched = []
        for name, fn in jit_functions().items():
            for kernel in compiled_variants(fn):
                launched.append({"kernel": name, **describe_compiled(kernel)})
        out["launched"] = launched or "no compiled kernel found in triton's caches (did the fused path run?)"
    except Exception as e:
        out["launched"] = f"{type(e).__name__}: {e}"[:1000]
    major, minor = torch.cuda.get_device_capability()
    out["offline"] = offline_resources(major * 10 + minor)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--kernels", action="store_true", help="registers/spills/shared memory (needs CUDA)")
    args = parser.parse_args(argv)
    if args.kernels:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--kernels needs a CUDA device")
        result: dict[str, Any] = kernel_resources()
    else:
        result = environment()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str) + "\n", encoding="utf-8")
    print(json.dumps(result, default=str)[:4000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
