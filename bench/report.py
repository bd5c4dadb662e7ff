"""Render bench/results/*.jsonl as a Markdown report (and PNG plots when matplotlib is installed).

    python bench/report.py                       # every results file -> bench/results/REPORT.md
    python bench/report.py FILE.jsonl --out R.md

Tables: training throughput (ours vs the reference, eager and compiled, MFU) and extraction
throughput across batch sizes and lengths. Every row names its device, versions and commit.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from spidr_fast.io import atomic_write_text

RESULTS_DIR = Path(__file__).parent / "results"


def load(paths: list[Path]) -> list[dict[str, Any]]:
    records = []
    for path in paths:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise SystemExit(f"{path}:{n}: not a JSON line ({e})") from e
    return records


def fmt(value: Any, spec: str = ".1f") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def fmt_ratio(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}x"


def cell(value: Any, spec: str = "") -> str:
    """A Markdown table cell: n/a for None, a float formatted with `spec` when given, pipes escaped."""
    if value is None:
        return "n/a"
    if isinstance(value, float) and spec:
        return format(value, spec)
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: list[str], rows: list[list[Any]], title: str | None = None) -> list[str]:
    """The lines of a Markdown table (under a `## title` when given), then a blank line."""
    heading = [f"## {title}", ""] if title else []
    return [
        *heading,
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(map(cell, row)) + " |" for row in rows),
        "",
    ]


def train_table(records: list[dict[str, Any]]) -> list[str]:
    rows = [r for r in records if r.get("benchmark") == "train_throughput"]
    if not rows:
        return []
    ref = {(r["device"], r["config"], r["compiled"], r["commit"]): r for r in rows if r["impl"] == "reference"}
    body = []
    for r in rows:
        base = ref.get((r["device"], r["config"], r["compiled"], r["commit"]))
        ratio = r["audio_seconds_per_s"] / base["audio_seconds_per_s"] if base and r["impl"] != "reference" else None
        mode = "compiled" if r["compiled"] else "eager"
        body.append([
            r["device"], r["config"], r["impl"], mode, f"{r['step_time_s'] * 1e3:.1f}",
            f"{r['audio_seconds_per_s']:.1f}", f"{r['frames_per_s']:.0f}", fmt(r["mfu"], ".1%"),
            fmt(r.get("peak_memory_gib"), ".1f"), fmt_ratio(ratio), r["commit"],
        ])  # fmt: skip
    header = ["device", "config", "impl", "mode", "ms/step", "audio s/s", "frames/s", "MFU", "peak GiB"]
    return markdown_table([*header, "vs reference", "commit"], body, "Training throughput (per device)")


def ablation_table(records: list[dict[str, Any]]) -> list[str]:
    rows = [r for r in records if r.get("benchmark") == "train_ablation"]
    if not rows:
        return []
    kind = rows[0].get("ablation_kind", "additive")
    base = next((r for r in rows if r["impl"] == "reference"), None)
    body = []
    for r in rows:
        ratio = r["audio_seconds_per_s"] / base["audio_seconds_per_s"] if base else None
        body.append([
            r["device"], r["config"], r["ablation"], ", ".join(r.get("fused_ops") or []) or "-",
            f"{r['audio_seconds_per_s']:.1f}", fmt(r["mfu"], ".1%"), fmt_ratio(ratio), r["commit"],
        ])  # fmt: skip
    header = ["device", "config", "step", "fused ops that ran", "audio s/s", "MFU", "vs reference", "commit"]
    what = "each fused op switched off in turn" if kind == "off-one" else "each row adds one change"
    return markdown_table(header, body, f"Training step ablation ({what})")


def extract_table(records: list[dict[str, Any]]) -> list[str]:
    # Records before the writer used "benchmark" carry the name under "bench".
    rows = [r for r in records if r.get("benchmark", r.get("bench")) == "extract_throughput"]
    if not rows:
        return []
    body = [
        [
            r["device"], r.get("cpu_threads"), r["config"], r["layer"], r.get("dtype", "float32"), r["num_utts"],
            f"{r['audio_seconds']:.1f}", r["impl"], f"{r['audio_seconds_per_second']:.2f}",
            fmt_ratio(r.get("speedup_vs_reference_single")), fmt(r.get("max_abs_error_vs_reference_single"), ".1e"),
            r["commit"],
        ]
        for r in rows
    ]  # fmt: skip
    header = ["device", "threads", "config", "layer", "dtype", "utterances", "audio s", "impl", "audio s/s"]
    header += ["vs reference one at a time", "max abs error", "commit"]
    title = "Extraction throughput (side by side with the reference, same weights and waveforms)"
    return markdown_table(header, body, title)


_ENV_KEYS = ("date", "device", "gpu_count", "cpu_threads", "torch", "triton", "cuda", "python", "commit")


def plot(records: list[dict[str, Any]], folder: Path) -> list[Path]:
    """Bar chart of training audio-seconds/s per implementation and mode, one per device and config."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r.get("benchmark") == "train_throughput":
            groups[r["device"], r["config"]].append(r)
    paths = []
    for (device, config), rows in groups.items():
        fig, ax = plt.subplots(figsize=(6, 3.5))
        labels = [f"{r['impl']}\n{'compiled' if r['compiled'] else 'eager'}" for r in rows]
        ax.bar(
            labels,
            [r["audio_seconds_per_s"] for r in rows],
            color=["C0" if r["impl"] == "spidr_fast" else "C1" for r in rows],
        )
        ax.set_ylabel("audio seconds / s / GPU")
        ax.set_title(f"training throughput: {config} on {device}")
        fig.tight_layout()
        path = folder / f"train_throughput_{config}_{device.split()[0].lower()}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", type=Path, help="JSONL results (default: bench/results/*.jsonl)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "REPORT.md")
    args = parser.parse_args(argv)
    files = args.files or sorted(RESULTS_DIR.glob("*.jsonl"))
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise SystemExit(f"no such results file: {', '.join(map(str, missing))}")
    records = load(files)
    lines = ["# spidr_fast benchmark report", "", f"From: {', '.join(f.name for f in files) or '(no results)'}", ""]
    lines += train_table(records) + ablation_table(records) + extract_table(records)
    args.out.parent.mkdir(parents=True, exist_ok=True)  # the plots go beside the report
    images = plot(records, args.out.parent)
    lines += [f"![{p.stem}]({p.name})" for p in images]
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    print(f"wrote {args.out}" + (f" and {len(images)} plot(s)" if images else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
