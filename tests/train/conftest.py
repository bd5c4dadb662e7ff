"""Trainer test fixtures: a small synthetic corpus and tiny-config runs in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Light on shared cores, and bitwise reproducible across processes.
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TORCHINDUCTOR_COMPILE_THREADS": "1"}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from spidr_fast.data.corpus import generate_corpus

    return generate_corpus(tmp_path_factory.mktemp("corpus"), num_utterances=16, seed=0, max_seconds=4.0)


def tiny_overrides(corpus: Path, workdir: Path, *extra: str) -> list[str]:
    return [
        f"data.manifest={corpus / 'manifest.csv'}",
        f"run.workdir={workdir}",
        "run.log_interval=1",
        "data.max_batch_length=96000",
        "run.device=cpu",  # not GPU tests: bitwise resume and fp32 comparisons hold on the CPU only
        *extra,
    ]


def train_command(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "spidr_fast.train", "tiny", *overrides]


def run_train(overrides: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        train_command(overrides), env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=timeout, check=False
    )


def read_log(run_dir: Path, split: str = "train") -> dict[int, dict]:
    """step -> record of the run's JSONL log (a resumed run's later record of a step wins)."""
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in records if r["split"] == split}
