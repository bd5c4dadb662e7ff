"""Report how phonetic discrete units are, against frame-level phone alignments.

UNITS_DIR holds units written by `spidr-fast extract --units ...` (searched recursively):
`c.units.npy`, `c.npy` or `c.pt` holding a 1-D array (--units-only), or `c.pt` dicts with "units";
50 units per second (merged runs from `--dedup` are expanded with their durations). ALIGNMENTS is
an `alignments.jsonl` (one {"fileid", "phones": [one label per 10 ms]} per line, as the built-in
corpus's; a corpus folder works too). A units file matches the
fileid equal to its path under UNITS_DIR without suffix, or else to its name.

Prints PNMI, phone and cluster purity, unit perplexity, active units, bitrate, mean run length
(definitions in `spidr_fast.metrics`), and writes a PNG of the phone x unit co-occurrence,
p(phone | unit), units ordered by their most frequent phone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `spidr-fast units-report`."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("units_dir", type=Path, help="folder of units written by `spidr-fast extract --units`")
    parser.add_argument("alignments", type=Path, help="alignments.jsonl (10 ms phone labels), or a corpus folder")
    parser.add_argument("--png", type=Path, help="co-occurrence figure (default: UNITS_DIR/units-report.png)")
    parser.add_argument("--json", type=Path, help="also write the metrics as JSON here")
    parser.add_argument("--unit-rate", type=float, default=50.0, help="units per second (default: 50)")
    parser.add_argument("--label-rate", type=float, default=100.0, help="alignment frames per second (default: 100)")
    parser.add_argument(
        "--ignore", action="append", default=None, help="phone label left out of the phone metrics (repeatable)"
    )


def read_units(folder: Path) -> dict[str, np.ndarray]:
    """Relative key (path without suffix, `.units` dropped) -> int64 frame units, for every units file
    (merged runs, `extract --dedup`, are expanded back to frames with their durations)."""
    from spidr_fast.units import expand_runs

    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder")
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.name.startswith(".") or path.suffix not in (".npy", ".pt"):
            continue
        key = path.relative_to(folder).with_suffix("").as_posix()
        if path.suffix == ".pt":
            import torch

            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, torch.Tensor) and obj.ndim == 1:  # --units-only --format pt: the units themselves
                out[key] = obj.numpy()
            elif isinstance(obj, dict) and "units" in obj:
                out[key] = obj["units"].numpy()
                if "durations" in obj:  # extract --dedup: runs back to frames
                    out[key] = expand_runs(out[key], obj["durations"].numpy())
        elif key.endswith(".units"):
            units, durations = np.load(path), path.with_name(path.name.replace(".units.npy", ".durations.npy"))
            out[key.removesuffix(".units")] = expand_runs(units, np.load(durations)) if durations.exists() else units
        elif "." not in path.stem and (array := np.load(path, mmap_mode="r")).ndim == 1:
            out[key] = np.asarray(array)
    if not out:
        raise ValueError(f"{folder}: no units files (.units.npy, 1-D .npy, or .pt with 'units') below it")
    for key, units in out.items():
        if units.ndim != 1 or not np.issubdtype(units.dtype, np.integer):
            raise ValueError(f"{folder / key}: units must be 1-D integers, got {units.dtype} {units.shape}")
    return out


def match(units: dict[str, np.ndarray], fileids: set[str]) -> dict[str, np.ndarray]:
    """fileid -> units: by relative key, else by the key's last path component."""
    out = {}
    for key, u in units.items():
        fileid = key if key in fileids else key.rsplit("/", 1)[-1]
        if fileid in fileids:
            out[fileid] = u
    return out


def plot_cooccurrence(counts: np.ndarray, phones: list[str], units: list[int], path: Path) -> None:
    """p(phone | unit) as an image, units sorted by their most frequent phone (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spidr_fast.io import atomic_write

    p = counts / np.maximum(counts.sum(0, keepdims=True), 1)  # (phones, units)
    order = np.lexsort((-p.max(0), p.argmax(0)))
    fig, ax = plt.subplots(figsize=(max(6, 0.12 * len(units) + 2), max(4, 0.2 * len(phones) + 1.5)))
    image = ax.imshow(p[:, order], aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1)
    ax.set_yticks(range(len(phones)), phones, fontsize=7)
    if len(units) <= 64:
        ax.set_xticks(range(len(units)), [str(units[i]) for i in order], fontsize=6, rotation=90)
    ax.set_xlabel(f"unit ({len(units)} used; sorted by most frequent phone)")
    ax.set_ylabel("phone")
    ax.set_title("p(phone | unit)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


# (row label, UnitMetrics field) of the report, also the demo's closing table (`format_columns`)
REPORT_ROWS = (
    ("frames (label rate)", "num_frames"),
    ("PNMI", "pnmi"),
    ("phone purity", "phone_purity"),
    ("cluster purity", "cluster_purity"),
    ("unit perplexity", "perplexity"),
    ("active units", "active_codewords"),
    ("bitrate (bits/s)", "bitrate"),
    ("mean run length (frames)", "mean_run_length"),
)


def report_rows(metrics: object) -> dict[str, float | int]:
    """Row label -> value of a `spidr_fast.metrics.UnitMetrics`, in the report's order."""
    return {label: getattr(metrics, field) for label, field in REPORT_ROWS}


def _cell(value: float | int, width: int) -> str:
    return f"{value + 0.0:{width}.4f}" if isinstance(value, float) else f"{value:{width}d}"  # + 0.0: no "-0.0000"


def format_columns(columns: dict[str, object]) -> list[str]:
    """The report's rows with one column per set of units (heading -> UnitMetrics): a markdown table."""
    rows = {heading: report_rows(m) for heading, m in columns.items()}
    widths = [max(len(h), 10) for h in columns]
    lines = ["| " + " | ".join([f"{'':26s}", *(f"{h:>{w}s}" for h, w in zip(columns, widths))]) + " |"]
    lines.append("|" + "|".join(["-" * 28, *("-" * (w + 1) + ":" for w in widths)]) + "|")
    for label, _ in REPORT_ROWS:
        cells = [_cell(rows[h][label], w) for h, w in zip(columns, widths)]
        lines.append("| " + " | ".join([f"{label:26s}", *cells]) + " |")
    return lines


def main(args: argparse.Namespace) -> int:
    """Print the report; exit status 2 on bad input."""
    try:
        return _run(args)
    except (ValueError, OSError) as exc:
        print(f"spidr-fast units-report: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from spidr_fast.data.corpus import read_alignments
    from spidr_fast.metrics import metrics_from_counts, phone_unit_counts

    alignments = read_alignments(args.alignments)
    units = match(read_units(args.units_dir), set(alignments))
    if not units:
        raise ValueError(f"no units file of {args.units_dir} matches a fileid of {args.alignments}")
    ignore = args.ignore or []
    counts, phones, ids = phone_unit_counts(
        units, alignments, unit_rate=args.unit_rate, label_rate=args.label_rate, ignore=ignore
    )
    # `match` kept only fileids of `alignments`: every utterance is in the table, in sorted order.
    metrics = metrics_from_counts(counts, [units[f] for f in sorted(units)], args.unit_rate)
    png = args.png or args.units_dir / "units-report.png"
    plot_cooccurrence(counts, phones, ids, png)
    rows = {"files": len(units), **report_rows(metrics)}
    print(f"units-report: {args.units_dir} against {args.alignments}" + (f" (ignoring {ignore})" if ignore else ""))
    for name, value in rows.items():
        print(f"  {name:26s} {value:.4f}" if isinstance(value, float) else f"  {name:26s} {value}")
    print(f"  co-occurrence figure: {png}")
    if args.json:
        from spidr_fast.io import atomic_write_text

        atomic_write_text(args.json, json.dumps(rows, indent=2) + "\n")
    return 0
