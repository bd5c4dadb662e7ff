"""Render a `make gpu-check` results folder as REPORT.md (every section says why when it has no data).

python bench/gpu_report.py DIR      # rewrites DIR/REPORT.md from the files in DIR
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report as tables  # bench/report.py: the training, ablation and extraction tables, the table helpers
from common import device_peaks
from report import cell, markdown_table

# The targets (measured here, never asserted by a test).
MFU_TARGET = 0.35
EXTRACT_RTF_TARGET = 10_000
CODEBOOK_SPEEDUP_TARGET = 5.0


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill at the time limit
    return out


def _stage_status(stages: list[dict], *names: str) -> str:
    rows = [s for s in stages if s["step"] in names]
    return "; ".join(f"{s['step']}: {s['status']}" + (f" ({s['reason']})" if s.get("reason") else "") for s in rows)


def environment_section(env: dict | None, run: dict | None) -> list[str]:
    lines = ["## 1. Environment", ""]
    if not env:
        return [*lines, "No environment record (the env step failed: see logs/env.log).", ""]
    gpu = env.get("gpu")
    rows = [
        ["GPU", gpu["name"] if gpu else f"none ({env.get('no_cuda_reason')})"],
        [
            "python / torch / CUDA / cuDNN",
            f"{env['python']} / {env['torch']} / {env.get('torch_cuda')} / {env.get('cudnn')}",
        ],
        ["triton", env["packages"].get("triton", {}).get("version")],
        ["CPU cores", env.get("cpu_count")],
    ]
    if gpu:
        rows += [
            ["capability / SMs / memory", f"{gpu['capability']} / {gpu['multiprocessors']} / {gpu['memory_gib']} GiB"],
            ["GPUs visible", gpu["count"]],
        ]
        smi = env.get("nvidia_smi")
        if isinstance(smi, dict):
            rows += [[f"nvidia-smi {k}", v] for k, v in smi.items() if k != "name"]
        else:
            rows.append(["nvidia-smi", smi])
        peaks = env.get("peaks")
        rows.append(
            ["datasheet peaks", ", ".join(f"{k} {v:g}" for k, v in peaks.items()) if peaks else "unknown device"]
        )
    ref = env.get("reference", {})
    if ref.get("available"):
        where = f"{ref.get('source')} {ref.get('version')} at {ref.get('path')}"
        where += f" (git {ref['git']})" if ref.get("git") else ""
    else:
        where = f"not importable: {ref.get('error')}"
    rows.append(["reference measured", where])
    for name, info in sorted(env.get("packages", {}).items()):
        rows.append(
            [
                f"package {name}",
                f"{info.get('version')} ({info.get('path')})"
                if info.get("available")
                else f"missing: {info.get('error')}",
            ]
        )
    if run:
        rows.append(["run", f"{run.get('command')}; {run.get('total_seconds')} s of {run.get('budget_seconds')} s"])
    return [*lines, *markdown_table(["what", "value"], rows)]


def kernel_resources_section(res: dict | None, stages: list[dict]) -> list[str]:
    lines = ["### Triton kernels as compiled for this device", ""]
    if not res:
        return [*lines, f"Not measured: {_stage_status(stages, 'env-kernels')}.", ""]
    if isinstance(res.get("ceilings"), dict):
        c = res["ceilings"]
        lines += [
            f"Measured ceilings: bf16 GEMM {cell(c.get('bf16_gemm_tflops'), '.0f')} TFLOP/s, "
            f"device copy {cell(c.get('copy_gbs'), '.0f')} GB/s (read + write).",
            "",
        ]
    launched = res.get("launched")
    lines += ["Launched by one base-config bf16 training step (triton's JIT caches):", ""]
    if isinstance(launched, list):
        rows = [
            [k["kernel"], k.get("regs"), k.get("spills"), k.get("shared"), k.get("num_warps"), k.get("num_stages")]
            for k in launched
        ]
        lines += markdown_table(["kernel", "registers", "spills", "shared B", "warps", "stages"], rows)
    else:
        lines += [f"Not available: {launched}", ""]
    offline = res.get("offline")
    lines += ["Offline compile at the base shapes, this device's capability (bench/sm90.py):", ""]
    if isinstance(offline, list):
        rows = [
            [
                k["kernel"],
                k["regs"],
                k["stack"],
                k["shared"],
                k["tensor_core_ops_in_loops"],
                ", ".join(f"{a}={b}" for a, b in k["config"].items()),
            ]
            for k in offline
        ]
        lines += markdown_table(
            ["kernel", "registers", "stack (spill) B", "shared B", "tensor-core ops in loops", "config"], rows
        )
    else:
        lines += [f"Not available: {offline}", ""]
    return lines


def junit_summary(path: Path) -> tuple[list[Any], list[str]]:
    """([tests, failures, errors, skipped, seconds], failing test ids with their messages)."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = [sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")]
    seconds = sum(float(s.get("time", 0)) for s in suites)
    failing = []
    for case in root.iter("testcase"):
        for tag in ("failure", "error"):
            node = case.find(tag)
            if node is not None:
                message = (node.get("message") or "").splitlines()[0][:200] if node.get("message") else ""
                failing.append(f"{case.get('classname')}::{case.get('name')} ({tag}): {message}")
    return [*counts, round(seconds, 1)], failing


def tests_section(out: Path, stages: list[dict]) -> list[str]:
    lines = ["## 2. Tests on the device", ""]
    rows, failing = [], []
    for name, step in (("junit_kernels.xml", "tests-kernels"), ("junit_gpu.xml", "tests-gpu")):
        path = out / name
        if not path.is_file():
            rows.append([step, "not run", "", "", "", "", _stage_status(stages, step)])
            continue
        try:
            counts, fails = junit_summary(path)
        except ET.ParseError as e:
            rows.append([step, f"unreadable {name}: {e}", "", "", "", "", ""])
            continue
        rows.append([step, *counts, name])
        failing += fails
    lines += markdown_table(["step", "tests", "failures", "errors", "skipped", "seconds", "details"], rows)
    if failing:
        lines += ["Failing:", "", *(f"- `{f}`" for f in failing[:60]), ""]
    return lines


def _peak_for(group: str, provider: str, peaks: dict | None) -> tuple[str, float | None]:
    if not peaks:
        return "", None
    if "bf16" in group:
        return "bf16", peaks["bf16_tflops"]
    if "tf32" in provider:
        return "tf32", peaks["tf32_tflops"]
    return "fp32", peaks["fp32_tflops"]


def kernels_section(out: Path, stages: list[dict], env: dict | None) -> tuple[list[str], dict[str, float]]:
    lines = ["## 3. Kernel microbenchmarks", ""]
    data = _json(out / "kernels.json")
    speedups: dict[str, float] = {}
    if not data or not data.get("benchmarks"):
        return [*lines, f"No results: {_stage_status(stages, 'kernels')}.", ""], speedups
    peaks = (env or {}).get("peaks") or device_peaks(data["benchmarks"][0].get("extra_info", {}).get("device", ""))
    groups: dict[str, list[dict]] = {}
    for b in data["benchmarks"]:
        groups.setdefault(b["group"] or b["name"], []).append(b)
    lines += [
        "Providers: `spidr_loop` = the reference's formulation (per codebook / head), `ref` = our batched "
        "reference, `compile_ref` = torch.compile(ref), `triton*` = ours. % peak: GB/s of the datasheet HBM "
        "bandwidth; TFLOP/s of the datasheet dense peak of the dtype the math runs in.",
        "",
    ]
    rows = []
    for group, benches in groups.items():
        median = {b["params"].get("provider", b["name"]): b["stats"]["median"] for b in benches}
        for b in benches:
            provider = b["params"].get("provider", b["name"])
            extra = b.get("extra_info", {})
            kind, peak = _peak_for(group, provider, peaks)
            gbs, tflops = extra.get("GB/s"), extra.get("TFLOP/s")
            loop = median.get("spidr_loop")
            vs_loop = loop / b["stats"]["median"] if loop else None
            vs_ref = median["ref"] / b["stats"]["median"] if median.get("ref") else None
            rows.append(
                [
                    group,
                    provider,
                    b["stats"]["median"] * 1e3,
                    gbs,
                    f"{gbs / peaks['hbm_gbs']:.0%}" if gbs and peaks else None,
                    tflops,
                    f"{tflops / peak:.0%} {kind}" if tflops and peak else None,
                    vs_loop,
                    vs_ref,
                    extra.get("peak_mem_gib"),
                ]
            )
            if group.startswith("codebook") and provider == "triton" and vs_loop:
                speedups[group] = vs_loop
    header = [
        "benchmark",
        "provider",
        "median ms",
        "GB/s",
        "% HBM",
        "TFLOP/s",
        "% peak",
        "vs spidr_loop",
        "vs ref",
        "peak GiB",
    ]
    lines += markdown_table(
        header,
        [
            [
                r[0],
                r[1],
                cell(r[2], ".3f"),
                cell(r[3], ".0f"),
                r[4],
                cell(r[5], ".1f"),
                r[6],
                cell(r[7], ".2f"),
                cell(r[8], ".2f"),
                cell(r[9], ".2f"),
            ]
            for r in rows
        ],
    )
    return lines, speedups


def profile_section(profile: dict | None, stages: list[dict]) -> list[str]:
    lines = ["### Profile of the training step, per kernel class", ""]
    if not profile:
        return [*lines, f"No profile: {_stage_status(stages, 'train-profile')}.", ""]
    lines += [
        f"{profile['steps']} steps, {profile['config']} config, {'compiled' if profile['compiled'] else 'eager'}, "
        f"{profile['timeline']}: {profile['total_ms_per_step']:.1f} ms of kernel time per step; fused ops "
        f"that ran: {', '.join(profile['fused_ops']) or 'none'}.",
        "",
    ]
    lines += markdown_table(
        ["class", "ms/step", "share", "calls/step", "distinct kernels"],
        [
            [
                r["class"],
                f"{r['ms_per_step']:.2f}",
                f"{r['share']:.1%}",
                f"{r['calls_per_step']:.0f}",
                r["distinct_kernels"],
            ]
            for r in profile["by_class"]
        ],
    )
    lines += ["Top kernels:", ""]
    lines += markdown_table(
        ["kernel", "class", "ms/step", "share"],
        [
            [f"`{r['name'][:90]}`", r["class"], f"{r['ms_per_step']:.2f}", f"{r['share']:.1%}"]
            for r in profile["top_kernels"][:12]
        ],
    )
    return lines


def roofline_section(cmp: dict | None, stages: list[dict]) -> list[str]:
    lines = ["### Predicted (bench/roofline.py) beside measured, per class", ""]
    if not cmp:
        return [*lines, f"No comparison: {_stage_status(stages, 'train-profile', 'train-roofline')}.", ""]
    shapes = ", ".join(f"{b['size']} x {b['samples'] / 16000:.1f} s ({b['steps']} steps)" for b in cmp["batches"])
    lines += [
        f"Predicted for {cmp['roofline_device']} ({cmp['variant']}, {cmp['config']} config, the profiled batches: "
        f"{shapes}); measured on {cmp['measured_device']} ({cmp['timeline']}). measured / predicted > 1: the "
        "class runs slower than the efficiencies in `roofline.EFFICIENCY` say.",
        "",
    ]
    if cmp.get("note"):
        lines += [f"**Note:** {cmp['note']}.", ""]
    total = cmp["total"]
    rows = [*cmp["by_class"], {"class": "**total**", **total}]
    lines += markdown_table(
        ["class", "predicted ms/step", "measured ms/step", "measured / predicted"],
        [[r["class"], f"{r['predicted_ms']:.2f}", f"{r['measured_ms']:.2f}", cell(r["ratio"], ".2f")] for r in rows],
    )
    return lines


def attention_section(rows: list[dict], stages: list[dict]) -> list[str]:
    dense = [r for r in rows if r.get("benchmark") == "attention_dense"]
    choices = [r for r in rows if r.get("benchmark") == "attention_dense_choice"]
    padded = [r for r in rows if r not in dense and r not in choices]
    lines = ["### Attention backends: one padded batch, forward + backward, vs masked SDPA in fp32", ""]
    lines += ["(`ran`: the backend that ran, after fallbacks; flash_attn_4 runs forward-only calls: ms is fwd)", ""]
    if not rows:
        return [*lines, f"No results: {_stage_status(stages, 'attention')}.", ""]
    lines += markdown_table(
        ["backend", "dtype", "status", "ran", "out rel err", "grad rel err", "fwd+bwd ms", "reason"],
        [
            [
                r["backend"],
                r["dtype"],
                r["status"],
                r.get("ran"),
                cell(r.get("out_rel_err"), ".1e"),
                cell(r.get("grad_rel_err"), ".1e"),
                cell(r.get("fwd_bwd_ms", r.get("fwd_ms")), ".3f"),
                r.get("reason"),
            ]
            for r in padded
        ],
    )
    if not dense:
        return lines
    shape = " x ".join(map(str, dense[0].get("shape", [])))
    lines += ["", f"### Attention backends: a dense batch (B x H x T x Dh = {shape}), vs SDPA in fp32", ""]
    lines += ["(each backend alone; errors at dropout 0; `default`: `kernels/attention.py` DENSE_ORDER's choice)", ""]
    lines += markdown_table(
        ["mode", "backend", "status", "out rel err", "grad rel err", "ms", "TFLOP/s", "reason"],
        [
            [
                r["mode"] + (" (default)" if r["backend"] == r.get("default") else ""),
                r["backend"],
                r["status"],
                cell(r.get("out_rel_err"), ".1e"),
                cell(r.get("grad_rel_err"), ".1e"),
                cell(r.get("ms"), ".3f"),
                cell(r.get("tflops"), ".0f"),
                r.get("reason"),
            ]
            for r in dense
        ],
    )
    return [*lines, "", *(f"- {r['summary']}" for r in choices), ""]


def targets_section(train: list[dict], extract: list[dict], codebook: dict[str, float]) -> list[str]:
    def verdict(value: float | None, target: float) -> str:
        return "n/a (not measured)" if value is None else ("met" if value >= target else "not met")

    ours = {r["compiled"]: r for r in train if r.get("benchmark") == "train_throughput" and r["impl"] == "spidr_fast"}
    ref = {r["compiled"]: r for r in train if r.get("benchmark") == "train_throughput" and r["impl"] == "reference"}
    rows = []
    for compiled in (False, True):
        mode = "compiled" if compiled else "eager"
        o, r = ours.get(compiled), ref.get(compiled)
        ratio = o["audio_seconds_per_s"] / r["audio_seconds_per_s"] if o and r else None
        rows.append([f"training step vs reference 0.2.0, {mode}", "> 1x", cell(ratio, ".2f"), verdict(ratio, 1.0)])
        mfu = o.get("mfu") if o else None
        rows.append([f"training MFU, {mode}", f">= {MFU_TARGET:.0%}", cell(mfu, ".1%"), verdict(mfu, MFU_TARGET)])
    layer6 = [r for r in extract if str(r.get("layer")) == "6" and r["impl"].startswith("spidr_fast")]
    best = max((r["audio_seconds_per_second"] for r in layer6), default=None)
    rows.append(
        [
            "extraction, layer 6 (best), x real time",
            f">= {EXTRACT_RTF_TARGET:,}",
            cell(best, ".0f"),
            verdict(best, EXTRACT_RTF_TARGET),
        ]
    )
    step = {g: v for g, v in codebook.items() if "N=6000" in g}
    value = min(step.values()) if step else None
    rows.append(
        [
            "codebook assign + accumulate vs the reference formulation, real step size",
            f">= {CODEBOOK_SPEEDUP_TARGET:g}x",
            cell(value, ".2f"),
            verdict(value, CODEBOOK_SPEEDUP_TARGET),
        ]
    )
    return ["## Targets (issue 11)", "", *markdown_table(["target", "mark", "measured", "verdict"], rows)]


def _safe(name: str, fn: Any, *args: Any) -> Any:
    """One section's lines, or None when its data was not what it expected (the rest still renders)."""
    try:
        return fn(*args)
    except Exception as e:  # a record cut or shaped unexpectedly must not cost the whole report
        print(f"report section {name!r} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def write_report(out: Path) -> Path:
    out = Path(out)
    stages = _jsonl(out / "stages.jsonl")
    env, run = _json(out / "env.json"), _json(out / "run.json")
    train, extract = _jsonl(out / "train.jsonl"), _jsonl(out / "extract.jsonl")
    gpu = (env or {}).get("gpu")
    title = gpu["name"] if gpu else "no GPU"
    lines = [f"# make gpu-check: {title}", ""]
    if run and run.get("smoke"):
        lines += ["**--smoke run: CPU, tiny shapes. It checks the harness; none of its numbers mean anything.**", ""]
    lines += ["## Steps", ""]
    lines += markdown_table(
        ["stage", "step", "what", "status", "seconds", "limit", "reason / log"],
        [
            [
                s["stage"],
                s["step"],
                s["title"],
                s["status"],
                s.get("seconds"),
                s.get("limit_s"),
                s.get("reason") or s.get("log") or "",
            ]
            for s in stages
        ],
    )
    kern_lines, codebook = _safe("kernel microbenchmarks", kernels_section, out, stages, env) or ([], {})
    train_steps = ("train-eager", "train-compiled", "train-compiled-ref", "train-ablation")
    sections = [
        ("targets", targets_section, train, extract, codebook),
        ("environment", environment_section, env, run),
        ("kernel resources", kernel_resources_section, _json(out / "kernel_resources.json"), stages),
        ("tests", tests_section, out, stages),
        ("kernel microbenchmarks", lambda: kern_lines),
        ("training", lambda: ["## 4. Training", ""] + (tables.train_table(train) + tables.ablation_table(train) or
                                                        [f"No results: {_stage_status(stages, *train_steps)}.", ""])),
        ("profile", profile_section, _json(out / "profile.json"), stages),
        ("roofline", roofline_section, _json(out / "roofline.json"), stages),
        ("extraction", lambda: ["## 5. Extraction", ""] + (tables.extract_table(extract) or
                                                           [f"No results: {_stage_status(stages, 'extract')}.", ""])),
        ("attention", attention_section, _jsonl(out / "attention.jsonl"), stages),
    ]  # fmt: skip
    for name, fn, *args in sections:
        lines += _safe(name, fn, *args) or [f"**The {name} section could not be rendered: see stderr.**", ""]
    path = out / "REPORT.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    print(write_report(Path(sys.argv[1])))
