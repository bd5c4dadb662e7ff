"""Training throughput per GPU: spidr_fast side by side with the reference `spidr` package.

Both implementations run the same training step (bf16 autocast forward, loss over the masked
frames, backward, grad clip, AdamW, teacher EMA) on the same batches, in the same process. spidr_fast
runs the trainer's own code: `parallelize` (regional compile), `build_optimizer` (fused AdamW on
CUDA, LR schedule) and `train_step` from `spidr_fast.train`; the reference runs its recipe's step
(AdamW 5e-4, betas 0.9/0.95, clip 10, `model.compile(dynamic=True)` as its trainer does). Utterance
lengths drawn from a LibriSpeech-like distribution (2-35 s), bucketed under the reference's budget
(3.8M samples per GPU for the base config) and cropped to the shortest of each batch, span masks as
in the recipe. The reference is run as its trainer runs it: with the all-True (B, 1, T, T) attention
mask its collator always passes (`--reference-mask none` passes no mask instead).

Reported per implementation and mode (eager, compiled): step time, audio seconds per second, frames
per second, MFU (FLOPs of one step counted with torch.utils.flop_counter; peak from the device
name) and peak memory. Results are appended as JSON lines to bench/results/.

    python bench/train_throughput.py --config base --steps 20             # one GPU
    python bench/train_throughput.py --smoke                              # CPU, tiny, < 1 min
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    RESULTS_DIR,
    append_jsonl,
    environ,
    environment,
    librispeech_like_lengths,
    require_reference,
    synchronize,
)

from spidr_fast import SpidR, SpidRConfig
from spidr_fast.config import DTYPES, SAMPLE_RATE, DataConfig, OptimizerConfig
from spidr_fast.data.batching import BucketBatchSampler, num_frames
from spidr_fast.data.masks import compute_mask_indices
from spidr_fast.kernels._dispatch import ANY_DEVICE_OPS, OPS, TRITON_OPS, use_fused
from spidr_fast.train.config import preset_model_fields
from spidr_fast.train.flops import count_step_flops, peak_flops
from spidr_fast.train.optim import build_optimizer
from spidr_fast.train.parallelize import parallelize
from spidr_fast.train.step import StepContext, train_step

SMALL = dict(
    extractor_conv_layer_config=[(64, 10, 5)] + [(64, 3, 2)] * 4 + [(64, 2, 2)] * 2,
    encoder_embed_dim=128,
    encoder_num_heads=4,
    encoder_num_layers=4,
    encoder_ff_interm_features=512,
    encoder_pos_conv_kernel=95,
    encoder_pos_conv_groups=16,
    codebook_size=64,
    num_codebooks=4,
)
# name -> (model fields, samples per batch, max samples per utterance)
PRESETS: dict[str, tuple[dict[str, Any], int, int]] = {
    "base": ({}, 3_800_000, 320_000),
    "small": (SMALL, 320_000, 96_000),
    "tiny": (preset_model_fields("tiny"), 32_000, 16_000),  # the shipped tiny preset's model
}


@dataclasses.dataclass
class Batch:
    waveforms: torch.Tensor
    mask_indices: torch.Tensor

    @property
    def audio_seconds(self) -> float:
        return self.waveforms.numel() / SAMPLE_RATE

    @property
    def frames(self) -> int:
        return int(num_frames(self.waveforms.shape[1]))


def make_batches(num: int, budget: int, max_len: int, seed: int, device: torch.device) -> list[Batch]:
    """`num` batches as the reference's data pipeline forms them, with random audio."""
    lengths = librispeech_like_lengths(max(400, num * budget // 200_000), seed=seed)
    config = DataConfig(max_batch_length=budget, max_sample_size=max_len, random_seed=seed)
    batch_indices = BucketBatchSampler(lengths, config, rank=0, world_size=1).all_batches(0)
    rng = np.random.default_rng(seed)
    batches = []
    for indices in batch_indices[:num]:
        crop = int(min(min(lengths[i] for i in indices), max_len))
        mask = compute_mask_indices((len(indices), int(num_frames(crop))), rng=rng)
        waveforms = torch.from_numpy(rng.standard_normal((len(indices), crop), dtype=np.float32))
        batches.append(Batch(waveforms.to(device), torch.from_numpy(mask).to(device)))
    return batches


def build(impl: str, fields: dict[str, Any], device: torch.device) -> torch.nn.Module:
    """The eager model in training mode (seed 0)."""
    torch.manual_seed(0)
    if impl == "spidr_fast":
        model = SpidR(SpidRConfig(**fields))
    else:
        from spidr.config import SpidRConfig as RefConfig
        from spidr.models import SpidR as RefSpidR

        model = RefSpidR(RefConfig(**fields))
    return model.to(device).train()


Step = Callable[[Batch, int], object]  # (batch, step number after this one) -> anything


def trainer_step(fields: dict[str, Any], device: torch.device, dtype: torch.dtype, compile_model: bool) -> Step:
    """spidr_fast's training step as its trainer builds it, on one device: `parallelize` (regional
    compile), `build_optimizer` and `StepContext` with the recipe's optimizer settings, `train_step`."""
    model = build("spidr_fast", fields, device)
    called, grad_scale = parallelize(
        model, parallelism="none", world_size=1, device=device, param_dtype=dtype, compile=compile_model
    )
    cfg = OptimizerConfig()
    optimizer, scheduler = build_optimizer(model, cfg)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    ctx = StepContext(called, model, optimizer, scheduler, params, cfg.max_norm, device, dtype, grad_scale)
    return lambda b, n: train_step(ctx, b.waveforms, b.mask_indices, n)


def reference_step(
    fields: dict[str, Any], device: torch.device, dtype: torch.dtype, compile_model: bool, mask: str
) -> Step:
    """The reference's training step as its recipe runs it; `mask` "all-true" passes the (B, 1, T, T)
    mask its collator always passes, "none" no mask."""
    model = build("reference", fields, device)
    if compile_model:
        model.compile(dynamic=True)  # what the reference's trainer does
    params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("teacher")]
    optimizer = torch.optim.AdamW(params, lr=5e-4, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.01)

    def step(b: Batch, n: int) -> None:
        attention_mask = None
        if mask == "all-true":
            attention_mask = torch.ones(b.waveforms.shape[0], 1, b.frames, b.frames, dtype=torch.bool, device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            losses, _ = model(b.waveforms, mask_indices=b.mask_indices, attention_mask=attention_mask)
        (losses.float().sum() / losses.numel()).backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_ema(n)

    return step


DTYPE_FLAGS = {"bf16": "bfloat16", "fp32": "float32"}  # --dtype -> spidr_fast.config.DTYPES name
_FLOPS: dict[tuple[str, str, int], int] = {}


def step_flops(impl: str, fields: dict[str, Any], config: str, batches: list[Batch], index: int, dtype) -> int:
    """FLOPs of one step on batches[index], counted once per implementation and batch on the eager model.
    spidr_fast is counted with every op on its reference (SPIDR_FAST_BACKEND=reference): the fused
    kernels' GEMMs (codebook distances, heads) are then counted like the reference's."""
    key = (impl, config, index)
    if key not in _FLOPS:
        b = batches[index]
        with environ(SPIDR_FAST_BACKEND="reference"):
            model = build(impl, fields, b.waveforms.device)
            _FLOPS[key] = count_step_flops(model, b.waveforms, b.mask_indices, dtype)
    return _FLOPS[key]


def run(impl: str, compile_model: bool, args: argparse.Namespace, batches: list[Batch]) -> dict[str, Any]:
    device = torch.device(args.device)
    fields, _, _ = PRESETS[args.config]
    dtype = DTYPES[DTYPE_FLAGS[args.dtype]]
    if impl == "spidr_fast":
        step = trainer_step(fields, device, dtype, compile_model)
    else:
        step = reference_step(fields, device, dtype, compile_model, args.reference_mask)

    # Every distinct batch shape goes through warm-up, so that no compilation lands in the timed steps.
    num_warmup = max(args.warmup, len(batches))
    for i in range(num_warmup):
        step(batches[i % len(batches)], i)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, audio, frames = [], 0.0, 0
    for i in range(args.steps):
        b = batches[i % len(batches)]
        t0 = time.perf_counter()
        step(b, num_warmup + i)
        synchronize(device)
        times.append(time.perf_counter() - t0)
        audio += b.audio_seconds
        frames += b.waveforms.shape[0] * b.frames
    total = sum(times)
    # FLOPs of the timed batches, counted on the eager model (compiled kernels do the same math).
    flops = sum(step_flops(impl, fields, args.config, batches, i % len(batches), dtype) for i in range(args.steps))
    peak = peak_flops(device)
    return {
        "benchmark": "train_throughput",
        "impl": impl,
        "compiled": compile_model,
        "config": args.config,
        "dtype": args.dtype,
        "reference_mask": args.reference_mask if impl == "reference" else None,
        "steps": args.steps,
        "step_time_s": total / args.steps,
        "step_time_median_s": statistics.median(times),
        "audio_seconds_per_s": audio / total,
        "frames_per_s": frames / total,
        "flops_per_step": flops / args.steps,
        "mfu": (flops / total) / peak if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


# The additive ablation of the training step: each row adds one change to the row above it.
ABLATION: list[tuple[str, str, bool, dict[str, str]]] = [
    ("reference", "reference", False, {}),
    ("+ no-mask attention (all ops on references)", "spidr_fast", False, {"SPIDR_FAST_BACKEND": "reference"}),
    ("+ fused front-end", "spidr_fast", False, {"SPIDR_FAST_REFERENCE_OPS": "codebook,heads_ce,pos_conv"}),
    ("+ fused pos-conv", "spidr_fast", False, {"SPIDR_FAST_REFERENCE_OPS": "codebook,heads_ce"}),
    ("+ fused codebooks", "spidr_fast", False, {"SPIDR_FAST_REFERENCE_OPS": "heads_ce"}),
    ("+ fused heads", "spidr_fast", False, {}),
    ("+ compile", "spidr_fast", True, {}),
]
# Each fused op switched off in turn (eager, spidr_fast): what each one is worth on its own.
# One op at a time on its reference: the Triton kernels and the residual dtype (attention and the targets
# are left out of the timed rows: SPIDR_FAST_REFERENCE_OPS=attention,targets by hand).
ABLATED_OPS = (*TRITON_OPS, *ANY_DEVICE_OPS)
OFF_ONE: list[tuple[str, str, bool, dict[str, str]]] = [
    ("all fused", "spidr_fast", False, {}),
    *[(f"- {op} (on its reference)", "spidr_fast", False, {"SPIDR_FAST_REFERENCE_OPS": op}) for op in ABLATED_OPS],
    ("all on references", "spidr_fast", False, {"SPIDR_FAST_BACKEND": "reference"}),
    ("reference package", "reference", False, {}),
]


def run_ablation(
    args: argparse.Namespace, batches: list[Batch], env: dict[str, Any], out: Path, kind: str = "additive"
) -> list[dict[str, Any]]:
    records = []
    rows = ABLATION if kind == "additive" else OFF_ONE
    if "reference" not in args.impl:
        rows = [row for row in rows if row[1] != "reference"]
    for name, impl, compiled, variables in rows:
        with environ(**{"SPIDR_FAST_BACKEND": None, "SPIDR_FAST_REFERENCE_OPS": None, **variables}):
            probe = torch.empty(0, device=args.device)
            fused = [op for op in OPS if impl == "spidr_fast" and use_fused(probe.device, op)]
            record = {**env, **run(impl, compiled, args, batches), "benchmark": "train_ablation", "ablation": name}
        record["ablation_kind"] = kind
        record["fused_ops"] = fused  # what actually ran fused (on CPU: none, the rows measure the same code)
        records.append(record)
        append_jsonl(out, [record])
        print(f"{name:>46}: {record['audio_seconds_per_s']:9.1f} audio s/s  MFU {fmt_mfu(record)}", flush=True)
    return records


def fmt_mfu(record: dict[str, Any]) -> str:
    return f"{record['mfu']:.1%}" if record["mfu"] is not None else "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(PRESETS), default=None, help="model size (default: base on GPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPE_FLAGS), default="bf16")
    parser.add_argument("--impl", nargs="+", choices=["spidr_fast", "reference"], default=["spidr_fast", "reference"])
    parser.add_argument(
        "--modes", nargs="*", choices=["eager", "compiled"], default=["eager", "compiled"], help="none: ablation only"
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps per implementation and mode")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens there)")
    parser.add_argument("--batches", type=int, default=5, help="distinct batches, cycled")
    parser.add_argument("--reference-mask", choices=["all-true", "none"], default="all-true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="JSONL file to append to")
    parser.add_argument(
        "--ablation",
        nargs="?",
        const="additive",
        choices=["additive", "off-one"],
        help="also run the ablation: additive (each row adds one change) or off-one (each fused op off in turn)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny config, 2 steps, eager only: checks the harness")
    args = parser.parse_args(argv)
    if args.smoke:
        args.config, args.steps, args.warmup, args.batches, args.modes = "tiny", 2, 1, 2, ["eager"]
    args.config = args.config or ("base" if args.device.startswith("cuda") else "small")
    if "reference" in args.impl or args.ablation == "additive":
        require_reference()
    device = torch.device(args.device)
    _, budget, max_len = PRESETS[args.config]
    batches = make_batches(args.batches, budget, max_len, args.seed, device)
    env = environment(device)
    out = args.out or RESULTS_DIR / f"train_throughput_{env['device'].split()[0].lower()}.jsonl"
    records = []
    for mode in args.modes:
        for impl in args.impl:
            record = {**env, **run(impl, mode == "compiled", args, batches)}
            records.append(record)
            append_jsonl(out, [record])  # as soon as measured: a later run that times out loses nothing
            print(
                f"{impl:>10} {mode:>8}: {record['step_time_s'] * 1e3:8.1f} ms/step  "
                f"{record['audio_seconds_per_s']:9.1f} audio s/s  {record['frames_per_s']:10.0f} frames/s  "
                f"MFU {fmt_mfu(record)}",
                flush=True,
            )
    by = {(r["impl"], r["compiled"]): r for r in records}
    for compiled in (False, True):
        if ("spidr_fast", compiled) in by and ("reference", compiled) in by:
            ours, ref = by["spidr_fast", compiled], by["reference", compiled]
            ratio = ours["audio_seconds_per_s"] / ref["audio_seconds_per_s"]
            print(f"spidr_fast / reference ({'compiled' if compiled else 'eager'}): {ratio:.2f}x")
    if args.ablation:
        records += run_ablation(args, batches, env, out, args.ablation)
    print(f"results appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
