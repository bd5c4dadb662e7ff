"""bench/report.py renders results files as Markdown tables (the same table helper as gpu_report.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import report

TRAIN = {
    "benchmark": "train_throughput", "device": "cpu x86_64", "config": "tiny", "compiled": False, "commit": "abc",
    "step_time_s": 0.5, "audio_seconds_per_s": 4.0, "frames_per_s": 200.0, "mfu": None,
}  # fmt: skip


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_report_into_a_new_folder(tmp_path: Path) -> None:
    # The output folder is created before the plots are saved into it (the plot failed before when it did not exist).
    results = write_jsonl(tmp_path / "train.jsonl", [{**TRAIN, "impl": "spidr_fast"}, {**TRAIN, "impl": "reference"}])
    out = tmp_path / "new" / "folder" / "REPORT.md"
    assert report.main([str(results), "--out", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert "| cpu x86_64 | tiny | spidr_fast | eager | 500.0 | 4.0 | 200 | n/a | n/a | 1.00x | abc |" in text
    assert "| cpu x86_64 | tiny | reference | eager | 500.0 | 4.0 | 200 | n/a | n/a | n/a | abc |" in text


def test_markdown_table_cells() -> None:
    lines = report.markdown_table(["a", "b"], [[None, "x|y"], [0.123456, 3]], title="T")
    assert lines == ["## T", "", "| a | b |", "|---|---|", "| n/a | x\\|y |", "| 0.123456 | 3 |", ""]
    assert report.cell(0.123456, ".2f") == "0.12"
    # A row whose text holds a pipe stays one row of the ablation table.
    row = {"benchmark": "train_ablation", "device": "d", "config": "c", "impl": "spidr_fast", "ablation": "+ a|b"}
    [*_, last, _] = report.ablation_table([{**row, "audio_seconds_per_s": 3.0, "mfu": 0.25, "commit": "x"}])
    assert last == "| d | c | + a\\|b | - | 3.0 | 25.0% | n/a | x |"
