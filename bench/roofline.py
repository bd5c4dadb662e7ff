"""Roofline predictor: where a training step's (or an extraction forward's) time goes on A100/H100/H200.

No GPU needed. The step is traced on `meta` tensors (roofline_trace.py), its ops classed by the kernels they
launch (roofline_classes.py) and priced per device (roofline_model.py) from the peaks, efficiencies and
instructions per element in roofline_tables.py, each with where it came from. This module writes the report
(per class, per region, the bounds; MFU, with all variants of one config measured against the same FLOPs: those
of spidr_fast's phase-A step), tabulates the built levers, is the CLI, and re-exports the names other code
imports (`from roofline import predict, classify, CLASSES`).

    python bench/roofline.py                                  # spidr_fast, base, 16 x 15 s, all devices
    python bench/roofline.py --compare spidr_fast reference   # side by side (all devices unless --device)
    python bench/roofline.py --compare spidr_fast spidr_fast:ref_ops=conv_frontend --json out.json
    python bench/roofline.py --device H100 --levers --eff conv_grouped=0.4     # built levers; an efficiency what-if
Variants: `spidr_fast` | `reference`, then `:eager`, `:whole`, `:layers`, `:ref_ops=a+b`, `:frozen`, `:extract`,
`:ncw` (roofline_trace.py says what each is). For the GPU check: `predict(config, device)` gives predicted ms per
class and `classify(kernel_name)` maps a profiler kernel name onto the same classes.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from roofline_classes import CLASSES, KERNEL_RULES, REGIONS, classify, kernel_classes, op_class, region_of
from roofline_model import dense_attention_key, efficiency, issue_instructions, issue_kernels, mfu, predict, summarize
from roofline_tables import DEVICES, EFFICIENCY, ISSUE_INSTRUCTIONS, ISSUE_KERNELS, ISSUE_SOURCE, device_peaks
from roofline_trace import Op, Trace, Variant, load_config, trace, trace_fn

__all__ = [  # the names other code imports from here, whichever module owns them
    "CLASSES", "DEVICES", "EFFICIENCY", "ISSUE_INSTRUCTIONS", "ISSUE_KERNELS", "ISSUE_SOURCE", "KERNEL_RULES",
    "LEVERS", "REGIONS", "Op", "Trace", "Variant", "bounds_table", "classify", "dense_attention_key", "device_peaks",
    "efficiency", "issue_instructions", "issue_kernels", "kernel_classes", "levers_table", "load_config", "main",
    "mfu", "op_class", "predict", "region_of", "report", "summarize", "trace", "trace_fn",
]  # fmt: skip


def _table(summaries: dict[str, dict], key: str, names: tuple[str, ...]) -> str:
    cols = list(summaries)
    head = "| " + key + " | " + " | ".join(f"{c} GFLOP / GB / ms" for c in cols) + " |"
    lines = [head, "|---|" + "---:|" * len(cols)]
    for n in names:
        if not any(n in s[key] for s in summaries.values()):
            continue
        cells = []
        for s in summaries.values():
            r = s[key].get(n, {})
            cells.append(f"{r.get('gflop', 0):,.0f} / {r.get('gb', 0):.2f} / {r.get('ms', 0):.2f}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    tot = [f"**{s['gflop']:,.0f} / {s['gb']:.1f} / {s['ms']:.1f}**" for s in summaries.values()]
    lines.append("| **total** | " + " | ".join(tot) + " |")
    return "\n".join(lines)


def tracer(config: Any = "base", batch: int = 16, seconds: float = 15.0) -> Callable[[Variant], Trace]:
    """`trace` at these settings, each variant traced once: the report and the levers table share steps."""
    return functools.cache(lambda v: trace(v, config, batch, seconds))


def report(variants: list[str], config: Any = "base", batch: int = 16, seconds: float = 15.0,
           devices: tuple[str, ...] = tuple(DEVICES), traced: Callable[[Variant], Trace] | None = None,
           ) -> tuple[str, dict]:  # fmt: skip
    """Markdown tables and a JSON-ready dict for `variants` (phases A and B for training variants)."""
    traced = traced or tracer(config, batch, seconds)
    traces = {}
    for spec in variants:
        v = Variant.parse(spec)
        traces[str(v)] = traced(v)
        if v.mode == "train":  # phase B (extractor frozen, EMA off) for the run average
            traces[str(dataclasses.replace(v, mode="frozen"))] = traced(dataclasses.replace(v, mode="frozen"))
    basis = traced(Variant()).model_flops
    audio = next(iter(traces.values())).audio_s
    out: dict[str, Any] = {"config": str(config), "batch": batch, "seconds": seconds, "audio_s": audio,
                           "mfu_basis_gflop": basis / 1e9, "efficiency": EFFICIENCY, "devices": DEVICES,
                           "variants": {}}  # fmt: skip
    lines = [f"# Roofline: {batch} x {seconds:g} s ({audio:g} audio-s per GPU), config {config}", "",
             f"MFU basis: {basis / 1e9:,.0f} GFLOP per step (spidr_fast phase A, forward + backward, counted as the "
             "trainer counts). Phase A: extractor trained + teacher EMA; B: extractor frozen, no EMA.", "",
             "| variant | device | A ms | B ms | run avg ms | MFU A | MFU run avg | compute floor ms "
             "| memory floor ms |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    per_device: dict[str, dict[str, dict]] = {}
    for name, tr in traces.items():
        for device in devices:
            s = summarize(tr, device)
            per_device.setdefault(device, {})[name] = s
            out["variants"].setdefault(name, {})[device] = s
    for spec in variants:
        name = str(Variant.parse(spec))
        frozen = str(dataclasses.replace(Variant.parse(spec), mode="frozen"))
        for device in devices:
            a = per_device[device][name]
            if Variant.parse(spec).mode != "train":
                lines.append(f"| {name} | {device} | {a['ms']:.1f} | | | | | {a['floor_compute_ms']:.1f} | "
                             f"{a['floor_memory_ms']:.1f} |")  # fmt: skip
                continue
            b = per_device[device][frozen]
            avg = (a["ms"] + b["ms"]) / 2
            m_a, m_avg = mfu(basis, a["ms"], device), mfu(basis, avg, device)
            out["variants"][name][device].update(run_avg_ms=avg, mfu=m_a, mfu_run_avg=m_avg)
            lines.append(f"| {name} | {device} | {a['ms']:.1f} | {b['ms']:.1f} | {avg:.1f} | {m_a:.1%} | "
                         f"{m_avg:.1%} | {a['floor_compute_ms']:.1f} | {a['floor_memory_ms']:.1f} |")  # fmt: skip
    main_device = "H100" if "H100" in devices else devices[0]
    shown = {str(Variant.parse(s)): per_device[main_device][str(Variant.parse(s))] for s in variants}
    lines += ["", f"## By class, {main_device} ({', '.join(shown)})", "", _table(shown, "classes", CLASSES)]
    lines += ["", f"## By region, {main_device}", "", _table(shown, "regions", REGIONS)]
    lines += [
        "",
        f"## Bounds by class, {main_device} (instruction issue: ISSUE_INSTRUCTIONS)",
        "",
        bounds_table(shown),
    ]
    lines += [
        "",
        "## Efficiencies (EFFICIENCY in bench/roofline_tables.py)",
        "",
        "| key | value | source |",
        "|---|---:|---|",
    ]
    lines += [f"| {k} | {v:g} | {src} |" for k, (v, src) in EFFICIENCY.items()]
    lines += ["", f"## Instructions per element (ISSUE_INSTRUCTIONS; {ISSUE_SOURCE})", "",
              "| kernel or op | thread-instructions / element |", "|---|---:|"]  # fmt: skip
    lines += [f"| {k} | {v:g} |" for k, v in ISSUE_INSTRUCTIONS.items()]
    return "\n".join(lines), out


def bounds_table(summaries: dict[str, dict]) -> str:
    """Per class of each summary: its predicted ms, the memory and issue bounds alone, and the ms of the ops whose
    instruction issue bounds them (more than their FLOPs and their bytes): the issue-bound classes."""
    lines = [
        "| variant | class | ms | memory bound ms | issue bound ms | issue-bound ops ms |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, s in summaries.items():
        for c, r in s["classes"].items():
            ms = [r["ms"], r.get("memory_ms", 0), r.get("issue_ms", 0), r.get("issue_bound_ms", 0)]
            lines.append(f"| {name} | {c} | " + " | ".join(f"{x:.2f}" for x in ms) + " |")
    bound = sorted({c for s in summaries.values() for c, r in s["classes"].items() if r.get("issue_bound_ms", 0) > 0})
    lines += [
        "",
        f"Issue-bound ops (instructions / issue rate above FLOPs and bytes) in: {', '.join(bound) or 'none'}.",
    ]
    return "\n".join(lines)


# The levers built so far, each switched off by a SPIDR_FAST_REFERENCE_OPS name (or COMPILE_GLUE: the
# `:layers` variant, the trainer's run.compile_glue=false); (title, name)
COMPILE_GLUE = "compile_glue"
LEVERS = (
    ("channels-last front-end (kernels/conv_frontend.py)", "frontend_layout"),
    ("bf16 residual stream (spidr_fast/models/layer_norm.py)", "residual_dtype"),
    ("first conv + LayerNorm + GELU fused (kernels/conv0.py)", "conv0"),
    ("fused positional conv layer (kernels/pos_conv.py)", "pos_conv"),
    ("dense attention backend per device (kernels/attention.py DENSE_ORDER)", "attention"),
    ("glue compiled by regions (GLUE_REGIONS, spidr_fast/train/parallelize.py)", COMPILE_GLUE),
)


def levers_table(config: Any = "base", batch: int = 16, seconds: float = 15.0, device: str = "H100",
                 traced: Callable[[Variant], Trace] | None = None) -> str:  # fmt: skip
    """spidr_fast with every built lever off, then each switched on in turn (cumulative), with and without the
    `ncw` what-if; run average of phases A and B, MFU on the spidr_fast basis."""
    traced = traced or tracer(config, batch, seconds)
    basis = traced(Variant()).model_flops
    lines = [f"| levers, cumulative ({device}) | ncw | A ms | B ms | run avg ms | gain ms | MFU run avg |",
             "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for ncw in (False, True):
        off = [name for _, name in LEVERS]
        first = None
        for title in ["all built levers off", *(f"+ {t}" for t, _ in LEVERS)]:
            if title.startswith("+"):
                off.pop(0)
            ref_ops = ",".join(name for name in off if name != COMPILE_GLUE)
            v = Variant(ref_ops=ref_ops, glue=COMPILE_GLUE not in off, ncw_transposes=ncw)
            a = summarize(traced(v), device)["ms"]
            b = summarize(traced(dataclasses.replace(v, mode="frozen")), device)["ms"]
            avg = (a + b) / 2
            first = avg if first is None else first
            lines.append(f"| {title} | {'yes' if ncw else 'no'} | {a:.1f} | {b:.1f} | {avg:.1f} | {first - avg:.1f} | "
                         f"{mfu(basis, avg, device):.1%} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="spidr_fast", help="variant to predict (without --compare)")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two variants side by side")
    ap.add_argument("--config", default="base", help="base, tiny, or a model config TOML/JSON")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=15.0, help="per utterance (16 x 15 s = 3.84M samples)")
    ap.add_argument("--device", choices=sorted(DEVICES), action="append", help="default: all")
    ap.add_argument("--json", help="also write the numbers here")
    ap.add_argument("--levers", action="store_true", help="also the built levers' cumulative gains (first device)")
    ap.add_argument("--eff", action="append", default=[], metavar="KEY=VALUE", help="what-if: an EFFICIENCY value")
    args = ap.parse_args(argv)
    for item in args.eff:
        key, _, value = item.partition("=")
        if key not in EFFICIENCY:
            raise SystemExit(f"--eff {item!r}: the key must be one of {sorted(EFFICIENCY)}")
        EFFICIENCY[key] = (float(value), f"what-if (--eff {item}); default {EFFICIENCY[key][0]:g}")
    variants = list(args.compare) if args.compare else [args.variant]
    devices = tuple(args.device or DEVICES)
    traced = tracer(args.config, args.batch, args.seconds)
    text, out = report(variants, args.config, args.batch, args.seconds, devices, traced)
    print(text)
    if args.levers:
        device = "H100" if "H100" in devices else devices[0]
        print(f"\n## Levers built (SPIDR_FAST_REFERENCE_OPS or `:layers` switches each off), {device}\n")
        print(levers_table(args.config, args.batch, args.seconds, device, traced))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
