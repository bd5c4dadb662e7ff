"""Roofline predictor: where a training step's (or an extraction forward's) time goes on A100/H100/H200.

No GPU needed. The step runs for real on `meta` tensors at the real batch: every aten op is dispatched
with its true shapes, dtypes and strides, nothing is computed, and each op is recorded with
  * FLOPs: torch's formulas corrected and completed by the trainer's own `FLOP_FORMULAS`
    (spidr_fast/train/flops.py): a grouped conv's weight gradient counted once, not `groups` times;
    attention (flash / memory-efficient SDPA and its backward); the fused custom ops;
  * bytes: distinct input storages read + outputs written (a broadcast dim counted once);
  * its class (the kind of kernel it launches: `CLASSES`) and its region (the module that ran it, carried
    to the backward through the autograd node).
Time per op = max(FLOPs / (eff x peak), bytes / (eff_mem x HBM bandwidth), instructions / (eff_issue x issue
rate)), at least `kernel_min_s` per kernel, with every efficiency in ONE table, `EFFICIENCY`, each with where it
came from. The issue rate is SMs x 4 schedulers x boost clock x 32 lanes (spidr_fast/devices.py); the instructions
per element of each Triton kernel and elementwise op come from its sm_90 SASS (`ISSUE_INSTRUCTIONS`,
bench/sass_per_element.py): an exact-erf GELU or a LayerNorm can take longer to issue than to move its bytes.

What the trace emulates of a CUDA run (the CPU build has no CUDA autocast):
  * bf16 autocast: the GEMM/conv/SDPA family in bf16, LayerNorm/GroupNorm/softmax/sum in fp32, leaf
    weights cast once per forward (autocast's cast cache);
  * SDPA: the flash backend when no mask is passed, memory-efficient with an additive bias otherwise;
    dropout as one fused `native_dropout`;
  * spidr_fast's ops take their Triton path (as on CUDA) unless `SPIDR_FAST_REFERENCE_OPS` lists them;
  * cuDNN's layout choice (a channels-last conv input gives a channels-last output) and the hidden
    `.contiguous()` copy of an eager LayerNorm given a non-contiguous input (serial helper-kernel time);
  * "compiled": runs of consecutive fusible ops (not GEMM, conv, attention, custom or multi-tensor ops)
    inside one compiled region become one kernel per reduction that moves only the values crossing the
    run's boundary. spidr_fast's regions are its trainer's, `COMPILED_REGIONS` of
    spidr_fast/train/parallelize.py (each transformer layer, and the glue regions between them); the
    reference 0.2.0 compiles the whole model (fwd + bwd; optimizer and EMA stay eager).
Limits: efficiencies are assumptions until `make gpu-check` calibrates them; the fusion estimate keeps
eager's saved-for-backward set (Inductor may recompute instead: compiled traffic is an upper bound); no
host time (no host syncs in either step), no communication (one GPU).
MFU = the step's model FLOPs (forward + backward, counted as the trainer counts them) / time / bf16 peak;
all variants of one config are measured against the same FLOPs (those of spidr_fast's phase-A step).

    python bench/roofline.py                                  # spidr_fast, base, 16 x 15 s, all devices
    python bench/roofline.py --compare spidr_fast reference   # side by side (all devices unless --device)
    python bench/roofline.py --compare spidr_fast spidr_fast:ref_ops=conv_frontend --json out.json
    python bench/roofline.py --device H100 --levers --eff conv_grouped=0.4     # built levers; an efficiency what-if
Variant: `spidr_fast` | `reference`, then `:eager`, `:whole` (spidr_fast compiled as one graph, glue
included, as the reference), `:layers` (spidr_fast with its layers compiled, not its glue: the trainer's
run.compile_glue=false), `:ref_ops=a+b` (SPIDR_FAST_REFERENCE_OPS),
`:frozen` (phase B: extractor frozen, no EMA), `:extract` (extraction forward), `:ncw` (what-if: cuDNN wraps
every channels-first bf16 conv in NCW <-> NHWC transposes, which a GPU profile shows or not). For the GPU check:
`predict(config, device)` gives predicted ms per class and `classify(kernel_name)` maps a profiler kernel
name onto the same classes.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from roofline_classes import (  # noqa: F401  (re-exported)
    CLASSES,
    GEMM_OPS,
    KERNEL_RULES,
    REDUCTION_WORDS,
    REGIONS,
    SCOPE,
    VIEW_OPS,
    classify,
    kernel_classes,
    op_class,
    region_of,
)
from roofline_tables import DEVICES, EFFICIENCY, ISSUE_INSTRUCTIONS, ISSUE_KERNELS, ISSUE_SOURCE, device_peaks
from roofline_trace import Op, Trace, Variant, load_config, trace, trace_fn  # noqa: F401  (re-exported)

# ------------------------------------------------------------------------------------------------
# The time model
# ------------------------------------------------------------------------------------------------


def _fused_costs(tr: Trace) -> tuple[list[float], list[float], list[float], list[float]]:
    """Per-op (bytes, helper-kernel bytes, kernels, issued thread-instructions) after fusing runs of consecutive
    fusible ops in one compiled region: a run moves the values entering it and those it produces that are read
    elsewhere (or never read: results), and has no helper kernels (Inductor generates its own LayerNorm, reading
    any strides). Its instructions: each member's own less a standalone kernel's loads, stores and indexing (a
    "copy"), plus one such overhead over the run's largest tensor."""
    nbytes = [float(op.bytes) for op in tr.ops]
    extra = [float(op.extra) for op in tr.ops]
    kernels = [float(op.kernels) for op in tr.ops]
    issued = [issue_instructions(op) for op in tr.ops]
    if tr.compiled is None:
        return nbytes, extra, kernels, issued
    readers: dict[int, set[int]] = collections.defaultdict(set)
    for i, op in enumerate(tr.ops):
        for v in op.ins:
            readers[v].add(i)
    runs, run, key = [], [], None
    for i, op in enumerate(tr.ops):
        k = tr.compiled(op)
        fusible = k is not None and op.cls == "norm/elementwise" and not op.name.startswith("spidr_fast::")
        if run and (not fusible or k != key):
            runs.append(run)
            run = []
        if fusible:
            run.append(i)
            key = k
    if run:
        runs.append(run)
    overhead = ISSUE_INSTRUCTIONS["copy"]
    for run in runs:
        members = set(run)
        produced = {v for i in run for v in tr.ops[i].outs}
        entering = {v for i in run for v in tr.ops[i].ins if v not in produced}
        leaving = {v for v in produced if not readers[v] or readers[v] - members}
        moved = sum(tr.value_bytes[v] for v in entering | leaving)
        reductions = sum(any(w in tr.ops[i].name for w in REDUCTION_WORDS) for i in run)
        own = sum(max(0.0, issued[i] - overhead * len(issue_kernels(tr.ops[i])) * tr.ops[i].elements) for i in run)
        fused_issued = own + overhead * max(tr.ops[i].elements for i in run)
        eager = sum(nbytes[i] for i in run) or 1.0
        for i in run:  # the run's traffic, kernels and instructions, shared in proportion to eager traffic
            share = nbytes[i] / eager
            nbytes[i], kernels[i], extra[i] = moved * share, max(1, reductions) * share, 0.0
            issued[i] = fused_issued * share
    return nbytes, extra, kernels, issued


def issue_kernels(op: Op) -> tuple[str, ...]:
    """The `ISSUE_INSTRUCTIONS` rows of the kernels `op` runs (none for GEMM, conv, attention, optimizer/EMA)."""
    if op.name in ISSUE_KERNELS:
        return ISSUE_KERNELS[op.name]
    if op.name in ISSUE_INSTRUCTIONS:
        return (op.name,)
    if op.cls != "norm/elementwise" or op.name.startswith("spidr_fast::"):
        return ()
    return ("sum",) if any(w in op.name for w in REDUCTION_WORDS) else ("add",)


def issue_instructions(op: Op) -> float:
    """Thread-instructions `op`'s kernels execute: `ISSUE_INSTRUCTIONS` per element x its largest tensor's elements."""
    return sum(ISSUE_INSTRUCTIONS[k] for k in issue_kernels(op)) * op.elements


# Compute capability by the family word in a device name: kernels/attention.py's DENSE_ORDER is keyed on it.
CAPABILITY = {"B200": (10, 0), "H100": (9, 0), "H200": (9, 0), "L40S": (8, 9), "A100": (8, 0)}


def dense_attention_key(device: str) -> str:
    """The `EFFICIENCY` key of the dense attention spidr_fast picks on `device`: the first SDPA backend of
    its `DENSE_ORDER` row (no flash-attn package assumed installed); flash SDPA's for an unknown family."""
    from spidr_fast.kernels.attention import dense_order

    capability = next((c for word, c in CAPABILITY.items() if word in device.upper()), (8, 0))
    sdpa = [b for b in dense_order(capability) if b.startswith("sdpa")]
    return "attention_cudnn" if sdpa[:1] == ["sdpa_cudnn"] else "attention"


def efficiency(op: Op, dense_key: str = "attention") -> float:
    """Fraction of the compute peak this op reaches (from `EFFICIENCY`); `dense_key`: that of unmasked SDPA."""
    if op.name.startswith("spidr_fast::pos_conv"):
        return EFFICIENCY["conv_pos_triton"][0]
    if op.cls == "conv":
        return EFFICIENCY["conv_grouped" if op.groups > 1 else "conv"][0]
    if op.cls == "attention":
        return EFFICIENCY["attention_bias" if "efficient" in op.name else dense_key][0]
    if not op.low_precision:
        return EFFICIENCY["gemm_fp32"][0]
    return EFFICIENCY["gemm" if op.flops >= 2e9 else "gemm_small"][0]


def summarize(tr: Trace, device: str = "H100") -> dict[str, Any]:
    """Per-class and per-region FLOPs, bytes, kernels and predicted ms; the step's ms and MFU."""
    hw = device_peaks(device)
    bw = hw["hbm"] * EFFICIENCY["memory"][0]
    nbytes, extra, kernels, issued = _fused_costs(tr)
    issue_rate = hw["issue"] * EFFICIENCY["issue"][0]
    dense_key = dense_attention_key(device) if tr.dense_attention else "attention"
    rows = {c: collections.Counter() for c in CLASSES}
    regions = {r: collections.Counter() for r in REGIONS}
    for op, b, e, k, n in zip(tr.ops, nbytes, extra, kernels, issued):
        t_compute = 0.0
        if op.flops:
            t_compute = op.flops / (hw["bf16" if op.low_precision else "fp32"] * efficiency(op, dense_key))
        t_issue = n / issue_rate
        t = max(t_compute, b / bw, t_issue, k * EFFICIENCY["kernel_min_s"][0]) + e / bw
        for row in (rows[op.cls], regions[op.region]):
            row["gflop"] += op.flops / 1e9
            row["gb"] += (b + e) / 1e9
            row["kernels"] += k
            row["ms"] += t * 1e3
            row["compute_bound_ms"] += t * 1e3 if t_compute >= max(b / bw, t_issue) else 0.0
            row["issue_bound_ms"] += t * 1e3 if t_issue > max(t_compute, b / bw) else 0.0
            row["issue_ms"] += t_issue * 1e3
            row["memory_ms"] += b / bw * 1e3
    total_ms = sum(r["ms"] for r in rows.values())
    return {
        "device": device,
        "classes": {c: dict(r) for c, r in rows.items() if r},
        "regions": {c: dict(r) for c, r in regions.items() if r},
        "ms": total_ms,
        "gflop": sum(op.flops for op in tr.ops) / 1e9,
        "model_gflop": tr.model_flops / 1e9,
        "gb": (sum(nbytes) + sum(extra)) / 1e9,
        "audio_s": tr.audio_s,
        "floor_compute_ms": sum(op.flops / hw["bf16" if op.low_precision else "fp32"] for op in tr.ops) * 1e3,
        "floor_memory_ms": (sum(nbytes) + sum(extra)) / hw["hbm"] * 1e3,
        "floor_issue_ms": sum(issued) / hw["issue"] * 1e3,
    }


def mfu(model_flops: float, ms: float, device: str) -> float:
    return model_flops / (ms / 1e3) / device_peaks(device)["bf16"]


def predict(config: Any = "base", device: str = "H100", variant: Variant | str = "spidr_fast", batch: int = 16,
            seconds: float = 15.0) -> dict[str, float]:  # fmt: skip
    """Predicted ms per class (`CLASSES`) of one step of `variant` at batch x seconds on `device`; what
    `make gpu-check` puts beside the measured per-class times (kernels classified with `classify`)."""
    s = summarize(trace(variant, config, batch, seconds), device)
    return {c: s["classes"].get(c, {}).get("ms", 0.0) for c in CLASSES}


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


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


def report(variants: list[str], config: Any = "base", batch: int = 16, seconds: float = 15.0,
           devices: tuple[str, ...] = tuple(DEVICES)) -> tuple[str, dict]:  # fmt: skip
    """Markdown tables and a JSON-ready dict for `variants` (phases A and B for training variants)."""
    traces, basis = {}, None
    for spec in variants:
        v = Variant.parse(spec)
        traces[str(v)] = trace(v, config, batch, seconds)
        if v.mode == "train":  # phase B (extractor frozen, EMA off) for the run average
            traces[str(dataclasses.replace(v, mode="frozen"))] = trace(dataclasses.replace(v, mode="frozen"),
                                                                       config, batch, seconds)  # fmt: skip
    basis_tr = trace(Variant(mode="train"), config, batch, seconds) if "spidr_fast" not in traces else None
    basis = (basis_tr or traces["spidr_fast"]).model_flops
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
        "## Efficiencies (EFFICIENCY in bench/roofline.py)",
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


def levers_table(config: Any = "base", batch: int = 16, seconds: float = 15.0, device: str = "H100") -> str:
    """spidr_fast with every built lever off, then each switched on in turn (cumulative), with and without the
    `ncw` what-if; run average of phases A and B, MFU on the spidr_fast basis."""
    basis = trace(Variant(), config, batch, seconds).model_flops
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
            a = summarize(trace(v, config, batch, seconds), device)["ms"]
            b = summarize(trace(dataclasses.replace(v, mode="frozen"), config, batch, seconds), device)["ms"]
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
    text, out = report(variants, args.config, args.batch, args.seconds, devices)
    print(text)
    if args.levers:
        device = "H100" if "H100" in devices else devices[0]
        print(f"\n## Levers built (SPIDR_FAST_REFERENCE_OPS or `:layers` switches each off), {device}\n")
        print(levers_table(args.config, args.batch, args.seconds, device))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
