"""Backend selection: defaults per device, the forcing variables, per-op reference switches."""

from __future__ import annotations

import pytest
import torch

from spidr_fast.kernels._dispatch import use_triton


def test_cpu_defaults_to_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPIDR_FAST_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter alone does not switch CPU tensors to Triton
    assert not use_triton(torch.zeros(1), "codebook")


def test_forced_triton_and_per_op_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPIDR_FAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SPIDR_FAST_REFERENCE_OPS", "codebook,conv_frontend")
    x = torch.zeros(1)
    assert not use_triton(x, "codebook") and not use_triton(x, "conv_frontend")
    assert use_triton(x, "heads_ce")


def test_forced_reference_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPIDR_FAST_BACKEND", "reference")
    assert not use_triton(torch.zeros(1), "heads_ce")


@pytest.mark.parametrize(
    ("variable", "value", "match"),
    [
        ("SPIDR_FAST_BACKEND", "cuda", "SPIDR_FAST_BACKEND must be one of"),
        ("SPIDR_FAST_REFERENCE_OPS", "attention", "unknown op"),
    ],
)
def test_bad_values_are_named(monkeypatch: pytest.MonkeyPatch, variable: str, value: str, match: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=match):
        use_triton(torch.zeros(1), "codebook")


def test_forced_triton_without_interpreter_on_cpu_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPIDR_FAST_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        use_triton(torch.zeros(1), "codebook")
