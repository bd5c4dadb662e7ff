"""The roofline's time model: the ops of a traced step (roofline_trace.py) priced on a device (roofline_tables.py).

Time per op = max(FLOPs / (eff x peak), bytes / (eff_mem x HBM bandwidth), instructions / (eff_issue x issue
rate)), at least `kernel_min_s` per kernel, plus its helper kernels' bytes (serial), with every efficiency from
`EFFICIENCY`; its instructions are `ISSUE_INSTRUCTIONS` per element x the elements of its largest tensor
(`issue_instructions`). Compiled: runs of consecutive fusible ops (not GEMM, conv, attention, custom or
multi-tensor ops) inside one compiled region become one kernel per reduction that moves only the values crossing
the run's boundary (`_fused_costs`).
Limits: the fusion estimate keeps eager's saved-for-backward set (Inductor may recompute instead: compiled
traffic is an upper bound); no host time (no host syncs in either step), no communication (one GPU).
MFU = the step's model FLOPs (forward + backward, counted as the trainer counts them) / time / bf16 peak.
"""

from __future__ import annotations

import collections
from typing import Any

from roofline_classes import CLASSES, REDUCTION_WORDS, REGIONS
from roofline_tables import EFFICIENCY, ISSUE_INSTRUCTIONS, ISSUE_KERNELS, device_peaks
from roofline_trace import Op, Trace, Variant, trace


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
