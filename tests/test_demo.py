"""`spidr-fast demo` end to end on a very small budget: it runs and prints its results table.

Behaviour only: no quality threshold and no timing (the demo's numbers depend on the budget and the CPU).
"""

from __future__ import annotations

import subprocess
import sys


def test_demo_runs_and_prints_results(tmp_path):
    cmd = [sys.executable, "-m", "spidr_fast", "demo", "--workdir", str(tmp_path), "--minutes", "0.3"]
    cmd += ["--utterances", "30", "--max-steps", "30", "run.device=cpu"]  # not a GPU test
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for text in ("[4/4] results", "loss", "target ppl", "codewords in use", "head argmax", "k-means", "PNMI"):
        assert text in out, out
    assert "phone purity" in out and "random init" in out and "trained" in out
    # Progress comes as plain lines (one per log interval), never as a carriage-return progress bar.
    assert "\r" not in out and "\r" not in proc.stderr
    assert "  step " in out
    assert (tmp_path / "runs" / "spidr" / "demo" / "spidr_demo.pt").is_file()
