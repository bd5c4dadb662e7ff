"""`make bench-smoke`'s harness runs end to end on CPU and writes well-formed results (never a timing check)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
TRAIN_FIELDS = {
    "benchmark", "impl", "compiled", "config", "device", "torch", "commit", "date", "step_time_s",
    "audio_seconds_per_s", "frames_per_s", "flops_per_step", "mfu", "peak_memory_gib",
}  # fmt: skip


def test_bench_smoke_writes_results_and_report(tmp_path: Path) -> None:
    # `make test` installs the reference; an interpreter brought with PYTHON=... may lack it.
    pytest.importorskip("spidr", reason="side-by-side benchmarks need the reference package spidr==0.2.0")
    pytest.importorskip("pytest_benchmark", reason="the kernel microbenchmarks need pytest-benchmark")
    run = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--smoke", "--out", str(tmp_path)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "train_smoke.jsonl").read_text().splitlines()]
    assert {r["impl"] for r in records} == {"spidr_fast", "reference"}
    for r in records:
        assert r.keys() >= TRAIN_FIELDS
        assert r["audio_seconds_per_s"] > 0 and r["flops_per_step"] > 0
    kernels = json.loads((tmp_path / "kernels_smoke.json").read_text())
    assert kernels["benchmarks"], "no kernel microbenchmark ran"
    report = (tmp_path / "REPORT_smoke.md").read_text()
    assert "| spidr_fast | eager |" in report and "| reference | eager |" in report
    extraction = [json.loads(line) for line in (tmp_path / "extract_smoke.jsonl").read_text().splitlines()]
    assert {r["benchmark"] for r in extraction} == {"extract_throughput"}
    assert any(r["impl"].startswith("spidr_fast") for r in extraction)
    units = [json.loads(line) for line in (tmp_path / "extract_units_smoke.jsonl").read_text().splitlines()]
    assert {r["impl"] for r in units} == {"features", "features+kmeans", "features+heads"}
    assert all(r["overhead_vs_features"] > 0 and r["commit"] for r in units)
    assert "## Extraction throughput" in report and "| reference batch=1 | " in report
