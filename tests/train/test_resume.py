"""SIGKILL during training then resume == uninterrupted run; export of a checkpoint to the released format."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.train.conftest import SUBPROCESS_ENV, read_log, run_train, tiny_overrides, train_command

STEPS = ["optimizer.max_steps=14", "run.save_interval=4", "run.keep_latest=2"]


@pytest.fixture(scope="module")
def uninterrupted(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("full")
    done = run_train(tiny_overrides(corpus, workdir, *STEPS))
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir / "spidr" / "tiny"


def test_sigkill_then_resume_equals_uninterrupted(corpus: Path, uninterrupted: Path, tmp_path: Path) -> None:
    overrides = tiny_overrides(corpus, tmp_path, *STEPS)
    run_dir = tmp_path / "spidr" / "tiny"
    proc = subprocess.Popen(
        train_command(overrides), env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoints" / "step_8.pt").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "checkpoints" / "step_14.pt").exists(), "the run finished before it was killed"

    resumed = run_train(overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr

    ref_log, log = read_log(uninterrupted), read_log(run_dir)
    assert sorted(log) == list(range(1, 15))
    for step in range(1, 15):
        assert log[step]["loss"] == ref_log[step]["loss"], step
        assert log[step]["lr"] == ref_log[step]["lr"]
        assert log[step]["target_ppl"] == ref_log[step]["target_ppl"]
    ref = torch.load(uninterrupted / "checkpoints" / "step_14.pt", weights_only=False)
    got = torch.load(run_dir / "checkpoints" / "step_14.pt", weights_only=False)
    assert ref["model"].keys() == got["model"].keys()
    for key in ref["model"]:
        assert torch.equal(ref["model"][key], got["model"][key]), key
    for pid, state in ref["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, got["optimizer"]["state"][pid][name]), (pid, name)
    assert got["train_state"] == ref["train_state"]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_12.pt", "step_14.pt"]  # keep 2


def test_export_loads_in_load_model_and_reference(uninterrupted: Path, tmp_path: Path) -> None:
    from spidr.models.utils import build_model as reference_build_model

    from spidr_fast import load_model
    from spidr_fast.train.export import export

    ckpt = uninterrupted / "checkpoints" / "step_14.pt"
    out = export(ckpt, tmp_path / "tiny.pt")
    assert set(torch.load(out, weights_only=True)) == {"model"} and (tmp_path / "config.json").is_file()
    model = load_model(out)
    state = torch.load(ckpt, weights_only=False)["model"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key

    wav = torch.randn(2, 16_000)
    ours = model.get_codebooks(wav)
    again = load_model(out).get_codebooks(wav)
    reference = reference_build_model(checkpoint=out, model_type="spidr").eval()
    theirs = reference.get_codebooks(wav)
    for a, b, c in zip(ours, again, theirs):
        if a is None:
            assert b is None and c is None
            continue
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)
