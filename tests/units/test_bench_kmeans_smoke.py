"""bench/kmeans_throughput.py runs end to end and writes well-formed records (never a timing check)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "kmeans_throughput.py"


def test_kmeans_bench_smoke(tmp_path):
    pytest.importorskip("sklearn")
    out = tmp_path / "k.jsonl"
    cmd = [sys.executable, str(BENCH), "--size", "smoke", "--iters", "2", "--threads", "1", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert {"spidr_fast", "sklearn"} <= {r["impl"] for r in records}
    inertias = [r["inertia"] for r in records]
    for r in records:
        assert r["iterations"] == 2 and r["iterations_per_s"] > 0 and r["commit"] and r["device"]
    assert max(inertias) / min(inertias) < 1.001  # the same iterations from the same start
