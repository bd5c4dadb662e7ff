"""Small helpers shared by the Triton launchers (block sizes, dtypes, interpreter quirks)."""

from __future__ import annotations

import torch

from spidr_fast.kernels._dispatch import interpreter_on


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def block_size(n: int, lo: int, hi: int) -> int:
    """A power-of-two block covering `n`, clamped to [lo, hi] (tl.dot needs tiles of at least 16)."""
    return max(lo, min(hi, next_pow2(n)))


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Whether a kernel must convert its tl.dot operands to fp32.

    fp32 inputs always run in fp32. bf16/fp16 run natively (fp32 accumulation) on a GPU, but the
    interpreter stores bf16 as raw uint16, so a bf16 tl.dot there returns garbage: convert first.
    """
    return dtype == torch.float32 or interpreter_on()


def fp32_uses_tf32(holders: tuple, legacy: object) -> bool:
    """One of torch's fp32 settings (TF32 or IEEE), read so that it works on torch 2.8-2.13.

    torch >= 2.9 has `fp32_precision` ("tf32", "ieee", or "none": inherit the next of `holders`, most specific
    first), which the legacy setters also update; reading the legacy `legacy.allow_tf32` raises there once the
    new API has set TF32. torch 2.8 has only the legacy flag.
    """
    for holder in holders:
        precision = getattr(holder, "fp32_precision", None)
        if precision not in (None, "none"):
            return precision == "tf32"
    try:
        return bool(legacy.allow_tf32)
    except RuntimeError:  # a torch that refuses the legacy read: the new API is in charge, and said nothing
        return False


def kernel_out_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype a kernel should store a low-precision result in; the launcher casts it afterwards.

    Under the interpreter, fp32 -> bf16 stores truncate instead of rounding, so kernels write fp32
    there and torch rounds. On a GPU they store `dtype` directly.
    """
    return torch.float32 if interpreter_on() else dtype


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def jit_in_place(namespace: dict, names: tuple[str, ...]) -> None:
    """Replace the plain functions `namespace[name]` by their `triton.jit` versions, once.

    Launchers call this before launching, instead of decorating at import, and kernel modules never
    import triton at import time: triton (its `triton.language` helpers too) chooses between the
    compiler and the interpreter when it decorates, and the kernel tests set TRITON_INTERPRET=1
    after `spidr_fast.kernels` is imported. Rebinding the module globals keeps calls between jit
    functions (resolved by name in the module) working; `tl` is bound there for the kernel bodies.
    """
    import triton
    import triton.language as tl

    namespace["tl"] = tl
    for name in names:
        fn = namespace[name]
        if not isinstance(fn, triton.runtime.KernelInterface):
            fn.__globals__["tl"] = tl  # a helper imported from another kernel module reads `tl` in its own module
            namespace[name] = triton.jit(fn)
            if fn.__globals__.get(name) is fn:  # ... and calls its module's other helpers (list them too) there
                fn.__globals__[name] = namespace[name]
