"""Which implementation an op runs: the fused Triton kernels or the plain-PyTorch references.

`SPIDR_FAST_BACKEND=triton|reference` forces one path. Without it, Triton runs where it can
(a CUDA tensor and an importable triton); with `TRITON_INTERPRET=1`, `triton` also runs the
kernels on CPU tensors (slow: for tests).
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("triton", "reference")


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def forced_backend() -> str | None:
    backend = os.environ.get("SPIDR_FAST_BACKEND")
    if backend is None or backend == "":
        return None
    if backend not in BACKENDS:
        raise ValueError(f"SPIDR_FAST_BACKEND must be one of {BACKENDS}, got {backend!r}")
    return backend


def use_triton(x: torch.Tensor) -> bool:
    """True when an op on `x` should run its Triton kernel."""
    backend = forced_backend()
    if backend == "reference":
        return False
    runnable = triton_available() and (x.is_cuda or interpreter_on())
    if backend == "triton" and not runnable:
        raise RuntimeError(
            "SPIDR_FAST_BACKEND=triton needs triton and a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors)"
        )
    return runnable
