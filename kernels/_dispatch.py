"""Which implementation an op runs: its fused path or its plain-PyTorch reference. One rule, `use_fused`.

The ops (`OPS`) and their fused paths: "codebook", "heads_ce", "conv_frontend" (channel LayerNorm +
GELU), "conv0" (the front-end's first conv fused with its LayerNorm + GELU), "pos_conv" are Triton kernels,
and "frontend_layout" the channels-last layout the conv front-end's blocks hand each other around
them (`models/feature_extractor.py`); "attention" is the packed varlen backends (flash-attn, nested
SDPA) and the per-device choice of a dense backend (cuDNN/flash SDPA, FlashAttention;
`kernels/attention.py`); "targets" the one-pass instance norm of the teacher targets (`kernels/targets.py`);
"residual_dtype" the transformer's LayerNorm output in the autocast dtype, a bf16 residual stream
(`models/layer_norm.py`; fused on every device by default).

- `SPIDR_FAST_BACKEND=reference`: every op runs its reference (an all-reference run).
- `SPIDR_FAST_BACKEND=triton`: every op runs its fused path (the Triton kernels on CPU tensors need
  `TRITON_INTERPRET=1`: slow, for tests; attention has packed backends on CUDA only).
- Unset: the fused paths on CUDA tensors (the Triton ones when triton imports), the references on CPU.
- `SPIDR_FAST_REFERENCE_OPS=codebook,heads_ce,pos_conv,...` keeps the listed ops on their references whatever
  the backend (for ablations: one fused op at a time).
An op's own setting may ask for its fused path where the default would not (`SPIDR_FAST_ATTENTION` and
`SPIDR_FAST_DENSE_ATTENTION` pick attention's backends, on any device); the reference settings above
still win.
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("triton", "reference")
# need triton (or the interpreter)
TRITON_OPS = ("codebook", "heads_ce", "conv_frontend", "conv0", "frontend_layout", "pos_conv")
ANY_DEVICE_OPS = ("residual_dtype",)  # fused by default on CPU too
OPS = ("attention", "targets", *TRITON_OPS, *ANY_DEVICE_OPS)


# find_spec, not import: triton must not be imported before a test sets TRITON_INTERPRET=1
# (triton.language decorates its own helpers for the compiler or the interpreter at import).
# A constant, so that torch.compile traces `use_fused` without a cached-function warning.
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


def reference_ops() -> set[str]:
    ops = {op for op in os.environ.get("SPIDR_FAST_REFERENCE_OPS", "").split(",") if op}
    if ops - set(OPS):
        raise ValueError(f"SPIDR_FAST_REFERENCE_OPS names unknown op(s) {sorted(ops - set(OPS))}; known: {OPS}")
    return ops


def reference_requested(op: str) -> bool:
    """True when the settings ask op `op` for its reference: `SPIDR_FAST_BACKEND=reference`, or `op` listed
    in `SPIDR_FAST_REFERENCE_OPS`. These win over every other setting: in `use_fused`, and for a fused path
    on by default where `use_fused` is not asked (the extractor's CPU channels-last front-end,
    `extraction/frontend.py`, is "frontend_layout")."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; known: {OPS}")
    return forced_backend() == "reference" or op in reference_ops()


def use_fused(device: torch.device, op: str, *, requested: bool = False) -> bool:
    """True when op `op` on `device` runs its fused path, False for its reference (the module docstring's rule).

    requested: the op's own setting asks for its fused path (as `SPIDR_FAST_BACKEND=triton` does for all).
    """
    if reference_requested(op):
        return False
    backend = forced_backend()
    forced = requested or backend == "triton"
    if op in ANY_DEVICE_OPS:
        return True
    if op not in TRITON_OPS:
        return forced or device.type == "cuda"
    if forced:
        if not (triton_available() and (device.type == "cuda" or interpreter_on())):
            raise RuntimeError(
                "SPIDR_FAST_BACKEND=triton needs triton and a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors)"
            )
        return True
    return device.type == "cuda" and triton_available()
