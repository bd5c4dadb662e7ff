"""Which implementation an op runs: the fused Triton kernels or the plain-PyTorch references.

`SPIDR_FAST_BACKEND=triton|reference` forces one path. Without it, Triton runs on CUDA tensors
(when triton imports) and the references run on CPU; with `TRITON_INTERPRET=1`,
`SPIDR_FAST_BACKEND=triton` runs the kernels on CPU tensors (slow: for tests).
`SPIDR_FAST_REFERENCE_OPS=codebook,heads_ce,conv_frontend` keeps the listed ops on their
references whatever the backend (for ablations: one fused op at a time); `frontend_layout` keeps the
fused front-end channels-first instead of channels-last, `residual_dtype` keeps the transformer's
LayerNorm outputs in fp32 under autocast (see spidr_fast/models/layer_norm.py).
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("triton", "reference")


# find_spec, not import: triton must not be imported before a test sets TRITON_INTERPRET=1
# (triton.language decorates its own helpers for the compiler or the interpreter at import).
# A constant, so that torch.compile traces `use_triton` without a cached-function warning.
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_FOUND


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def forced_backend() -> str | None:
    backend = os.environ.get("SPIDR_FAST_BACKEND")
    if backend is None or backend == "":
        return None
    if backend not in BACKENDS:
        raise ValueError(f"SPIDR_FAST_BACKEND must be one of {BACKENDS}, got {backend!r}")
    return backend


OPS = ("codebook", "heads_ce", "conv_frontend", "frontend_layout", "residual_dtype")


def reference_ops() -> set[str]:
    ops = {op for op in os.environ.get("SPIDR_FAST_REFERENCE_OPS", "").split(",") if op}
    if ops - set(OPS):
        raise ValueError(f"SPIDR_FAST_REFERENCE_OPS names unknown op(s) {sorted(ops - set(OPS))}; known: {OPS}")
    return ops


def use_triton(x: torch.Tensor, op: str | None = None) -> bool:
    """True when op `op` on `x` should run its Triton kernel.

    Default: Triton for CUDA tensors when triton imports, the reference otherwise (also on CPU
    under TRITON_INTERPRET=1, so that the interpreter runs only where a test asks for it).
    `SPIDR_FAST_BACKEND=triton` forces the kernels (on CPU tensors that needs TRITON_INTERPRET=1).
    """
    backend = forced_backend()
    if backend == "reference" or (op is not None and op in reference_ops()):
        return False
    if backend == "triton":
        if not (triton_available() and (x.is_cuda or interpreter_on())):
            raise RuntimeError(
                "SPIDR_FAST_BACKEND=triton needs triton and a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors)"
            )
        return True
    return x.is_cuda and triton_available()
