"""Atomic writes keep the umask's permissions (0644 under umask 022), whoever writes the file."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import spidr_fast
from spidr_fast.config import SpidRConfig
from spidr_fast.data.manifest import ManifestEntry, write_manifest
from spidr_fast.io import atomic_write, atomic_write_text, write_failures
from spidr_fast.train.checkpoint import Checkpointer
from spidr_fast.train.config import config_from_dict, save_resolved
from tests.extraction.conftest import TINY


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_write_has_the_umask_permissions(tmp_path: Path, umask_022: None) -> None:
    text = atomic_write_text(tmp_path / "sub" / "a.txt", "hello\n")
    blob = atomic_write(tmp_path / "b.pt", lambda tmp: torch.save({"x": torch.ones(2)}, tmp))
    failures = write_failures(tmp_path / "failures.jsonl", [("x.wav", "unreadable")])
    assert [mode(p) for p in (text, blob, failures)] == [0o644] * 3
    assert text.read_text() == "hello\n" and torch.load(blob)["x"].tolist() == [1.0, 1.0]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.txt", "b.pt", "failures.jsonl", "sub"]  # no temp left
    os.umask(0o077)  # a stricter umask is kept too
    assert mode(atomic_write_text(tmp_path / "private.txt", "x")) == 0o600


def test_failed_write_leaves_no_file(tmp_path: Path) -> None:
    def fail(tmp: str) -> None:
        Path(tmp).write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(tmp_path / "out.npy", fail)
    assert list(tmp_path.iterdir()) == []


def test_exported_checkpoints_manifests_and_configs_are_readable_by_others(tmp_path: Path, umask_022: None) -> None:
    model = spidr_fast.SpidR(SpidRConfig(**TINY))
    exported = spidr_fast.save_model(model, tmp_path / "export" / "model.pt")
    manifest = write_manifest([ManifestEntry("a", str(tmp_path / "a.wav"), 400)], tmp_path / "m.csv")
    config = save_resolved(config_from_dict({}), tmp_path / "run")
    net = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    trained = Checkpointer(tmp_path / "ckpts", interval=1).save(1, net, optimizer, scheduler, {"epoch": 0})
    for path in (exported, exported.parent / "config.json", manifest, config, trained):
        assert mode(path) == 0o644, path
