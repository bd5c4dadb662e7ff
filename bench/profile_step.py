"""A ~20-step torch.profiler profile of the spidr_fast training step, summarised per kernel class.

The trainer's own step, as `train_throughput.py` times it (`trainer_step`: bf16 autocast forward,
loss, backward, clip, AdamW, teacher EMA), on the same batches; warm-up steps first (compilation,
cuDNN autotuning), then `--steps` profiled steps. Every device kernel (CPU ops when there is no
GPU) is put in one class by its name (GEMM, attention, our fused Triton kernels, inductor-generated
Triton, convolution, normalisation, elementwise, reduction, copies, optimizer, ...); the JSON holds
the time per class and the top kernels.

    python bench/profile_step.py --config base --steps 20 --out profile.json   # one GPU
    python bench/profile_step.py --smoke --out profile.json                      # CPU, tiny
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import roofline
from common import environment, synchronize
from train_throughput import PRESETS, make_batches, trainer_step

from spidr_fast.kernels._dispatch import OPS, use_fused

CLASS_NOTE = "`bench/roofline.py`'s classes (`classify` on kernel names; CPU ops by `op_class`)"


def kernel_class(name: str) -> str:
    """The profile's (finer) class of a kernel: `roofline.KERNEL_RULES`, the rules `roofline.classify` uses."""
    return roofline.kernel_classes(name)[0]


def event_times(prof: torch.profiler.profile, device: str) -> list[tuple[str, float, int]]:
    """(name, self time in microseconds, calls) of every kernel on `device` (CPU: every CPU op)."""
    rows = []
    for e in prof.key_averages():
        if device == "cuda":
            us = getattr(e, "self_device_time_total", None)
            us = getattr(e, "self_cuda_time_total", 0.0) if us is None else us
            on_device = str(getattr(e, "device_type", "")).lower().endswith("cuda")
            if not on_device or us <= 0:
                continue
        else:
            us = e.self_cpu_time_total
            if us <= 0:
                continue
        rows.append((e.key, float(us), int(e.count)))
    return rows


def summarise(rows: list[tuple[str, float, int]], steps: int, top: int = 25) -> dict[str, Any]:
    total = sum(us for _, us, _ in rows) or 1.0
    classes: dict[str, dict[str, float]] = defaultdict(lambda: {"us": 0.0, "calls": 0, "kernels": 0})
    for name, us, calls in rows:
        c = classes[kernel_class(name)]
        c["us"] += us
        c["calls"] += calls
        c["kernels"] += 1
    by_class = [
        {
            "class": k,
            "ms_per_step": v["us"] / 1e3 / steps,
            "share": v["us"] / total,
            "calls_per_step": v["calls"] / steps,
            "distinct_kernels": v["kernels"],
        }
        for k, v in sorted(classes.items(), key=lambda kv: -kv[1]["us"])
    ]
    top_kernels = [
        {
            "name": name[:160],
            "class": kernel_class(name),
            "ms_per_step": us / 1e3 / steps,
            "share": us / total,
            "calls_per_step": calls / steps,
        }
        for name, us, calls in sorted(rows, key=lambda r: -r[1])[:top]
    ]
    return {"total_ms_per_step": total / 1e3 / steps, "by_class": by_class, "top_kernels": top_kernels}


def model_class(name: str, timeline_device: str) -> str:
    """The roofline predictor's class (`roofline.CLASSES`) of a profiled kernel (CUDA) or aten op (CPU)."""
    if timeline_device == "cuda":
        return roofline.classify(name)
    return roofline.op_class(name.split("::")[-1]) if name.startswith("aten::") else "other"


def by_model_class(rows: list[tuple[str, float, int]], steps: int, timeline_device: str) -> dict[str, float]:
    """Measured ms per step in each of the roofline predictor's classes (all of them, zeros included)."""
    ms = dict.fromkeys(roofline.CLASSES, 0.0)
    for name, us, _ in rows:
        ms[model_class(name, timeline_device)] += us / 1e3 / steps
    return ms


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(PRESETS), default="base")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20, help="profiled steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batches", type=int, default=3, help="distinct batches, cycled")
    parser.add_argument("--compiled", action="store_true", help="profile the compiled step (per-layer compile)")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--smoke", action="store_true", help="tiny config, 2 steps, CPU-friendly")
    args = parser.parse_args(argv)
    if args.smoke:
        args.config, args.steps, args.warmup, args.batches = "tiny", 2, 1, 1
    device = torch.device(args.device)
    fields, budget, max_len = PRESETS[args.config]
    batches = make_batches(args.batches, budget, max_len, 0, device)
    train_step = trainer_step(fields, device, torch.bfloat16, args.compiled)

    def step(i: int) -> None:
        train_step(batches[i % len(batches)], i)

    for i in range(max(args.warmup, len(batches))):
        step(i)
    synchronize(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for i in range(args.steps):
            step(1000 + i)
        synchronize(device)
    probe = torch.empty(0, device=device)
    rows = event_times(prof, device.type)
    shapes: dict[tuple[int, int], int] = defaultdict(int)  # (utterances, samples) of the profiled steps
    for i in range(args.steps):
        shapes[tuple(batches[(1000 + i) % len(batches)].waveforms.shape)] += 1
    result = {
        "benchmark": "train_profile",
        "config": args.config,
        "compiled": args.compiled,
        "steps": args.steps,
        "fused_ops": [op for op in OPS if use_fused(probe.device, op)],
        "timeline": "device kernels" if device.type == "cuda" else "CPU ops (no GPU)",
        "batches": [{"size": b, "samples": t, "steps": n} for (b, t), n in shapes.items()],
        **summarise(rows, args.steps),
        "by_model_class": by_model_class(rows, args.steps, device.type),
        "model_class_note": CLASS_NOTE,
        **environment(device),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    for row in result["by_class"]:
        print(f"{row['class']:>22}: {row['ms_per_step']:8.2f} ms/step  {row['share']:6.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
