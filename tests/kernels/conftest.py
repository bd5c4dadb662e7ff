"""Kernel tests: Triton kernels against their references, on CUDA or (without one) the interpreter.

TRITON_INTERPRET must be set before triton is imported: triton.language decorates its own helpers
for the compiler or the interpreter at import. spidr_fast.kernels never imports triton at import
time (kernels are jitted at their first launch), so setting it here, at collection, is early enough.
"""

from __future__ import annotations

import os
import sys

import torch

_TRITON_PREIMPORTED = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from spidr_fast.kernels._dispatch import triton_available  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def triton_backend(monkeypatch: pytest.MonkeyPatch) -> str:
    """Force the fused path of the public functions (on CPU: the interpreter). Returns the device."""
    if not triton_available():
        pytest.skip("triton is not installed")
    if DEVICE == "cpu" and _TRITON_PREIMPORTED:
        pytest.fail("triton was imported before tests/kernels/conftest.py could set TRITON_INTERPRET=1")
    monkeypatch.setenv("SPIDR_FAST_BACKEND", "triton")
    return DEVICE


@pytest.fixture
def reference_backend(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("SPIDR_FAST_BACKEND", "reference")
    return DEVICE
