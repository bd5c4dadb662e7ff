"""Unit outputs of `spidr-fast extract` beyond one array per file: merged runs and one units.jsonl.

- `--dedup`: runs of a repeated unit become one (unit, duration in frames) pair: the "units" output
  holds the units of the runs and a "durations" output (int64, frames at 50 Hz) sits beside it;
  `spidr_fast.units.expand_runs(units, durations)` gives the frame units back.
- `--units-format jsonl`: after the per-file outputs (written and resumed as always: they are the
  shards), `OUTPUT_DIR/units.jsonl` gets one line per complete file, sorted by output key,
  `{"file": "a/b/c.flac", "units": [...], "durations": [...]}` ("durations" with --dedup), written
  atomically. A run killed at any point and rerun ends with the same units.jsonl. Under torchrun
  each rank writes `units.rank{r}.jsonl` for its share; after a barrier rank 0 merges them (in key
  order: the same units.jsonl as one process writes), writes units.jsonl atomically and deletes
  them. A rank killed before the barrier means no merge; the rerun writes every share again.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from spidr_fast.extraction.files import Input, is_complete, read_pt
from spidr_fast.io import atomic_write_text
from spidr_fast.units import merge_runs


def dedup_result(result: dict[str, Tensor]) -> dict[str, Tensor]:
    """`result` with its "units" (frames,) replaced by the runs' units and their "durations" (runs,)."""
    units, durations = merge_runs(result["units"])
    return {**result, "units": torch.from_numpy(units), "durations": torch.from_numpy(durations)}


def _read(paths: dict[str, Path], name: str) -> np.ndarray:
    if "*" in paths:
        return read_pt(paths["*"], name).numpy()
    return np.load(paths[name])


def _file_field(item: Input) -> str:
    return item.key + Path(item.entry.path).suffix


def write_units_jsonl(
    path: Path, inputs: Sequence[Input], paths: dict[str, dict[str, Path]], names: Sequence[str]
) -> int:
    """One line per input whose outputs are complete (sorted by key); returns the line count."""
    lines = []
    for item in sorted(inputs, key=lambda i: i.key):
        if not is_complete(paths[item.key], names):
            continue  # failed: listed in failures.jsonl
        row = {"file": _file_field(item), "units": _read(paths[item.key], "units").tolist()}
        if "durations" in names:
            row["durations"] = _read(paths[item.key], "durations").tolist()
        lines.append(json.dumps(row) + "\n")
    atomic_write_text(path, "".join(lines))
    return len(lines)


def rank_units_jsonl(out_dir: Path, rank: int) -> Path:
    return out_dir / f"units.rank{rank}.jsonl"


def merge_units_jsonl(out_dir: Path, world: int, inputs: Sequence[Input]) -> int:
    """Rank 0, once every rank has written its share: `units.rank{r}.jsonl` for r < world into one
    `out_dir/units.jsonl` (lines in key order; `inputs` are all ranks' inputs), written atomically;
    the shares are deleted after. Returns the line count."""
    key_of = {_file_field(item): item.key for item in inputs}
    rows: list[tuple[str, str]] = []
    shares = [rank_units_jsonl(out_dir, r) for r in range(world)]
    for share in shares:
        if not share.is_file():
            raise FileNotFoundError(f"{share}: a rank's units are missing (did it fail?); rerun to write them")
        with share.open(encoding="utf-8") as f:
            for line in filter(str.strip, f):
                rows.append((key_of[json.loads(line)["file"]], line if line.endswith("\n") else line + "\n"))
    rows.sort()
    atomic_write_text(out_dir / "units.jsonl", "".join(line for _, line in rows))
    for share in shares:
        share.unlink()
    return len(rows)
