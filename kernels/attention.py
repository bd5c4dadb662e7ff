"""Self-attention backends for the transformer blocks.

q, k, v: (B, H, T, Dh) -> (B, H, T, Dh). A padded batch is described once per forward by a
`Padding`, built OUTSIDE the compiled layers (`Padding.from_mask`, once per batch): the key mask,
and for the packed backends the flat indices of the real frames and int32 cumulative lengths (a
`nonzero`, i.e. a host sync, that must not run inside a compiled region). None means nothing is
padded: then a dense backend runs, with no mask (any mask, even all-True, rules out the flash and
cuDNN kernels).

Backends for padded batches, chosen per call (`select_backend`) from those the `Padding` was built
for, by dtype and dropout:
- "flash_attn_4": FlashAttention-4 (`flash_attn.cute`, the `flash-attn-4` wheel; CuTe DSL, Hopper
  and newer) on the packed real frames. It has no dropout and spidr_fast calls only its forward
  (an opaque custom op): chosen for fp16/bf16 calls without dropout or gradient (the teacher,
  extraction).
- "flash_attn": flash-attn 2's `flash_attn_varlen_func` on the packed real frames (fp16/bf16,
  dropout, backward).
- "nested": SDPA on nested jagged tensors built from the packed frames (CUDA without flash-attn;
  SDPA's flash backend runs them).
- "masked": SDPA with a broadcast (B, 1, 1, T) key mask, never a (T, T) one: the CPU default, the
  fallback of every other backend (fp32 inputs for the flash ones; a `Padding` built inside a
  compiled region, which has no packed metadata), and the reference the others are tested against.
The packed backends take `max_seqlen` = T, the padded length (a bound, which is all they need; the
exact value would be a host sync, and a Python int that a compiled layer would specialise on).
Padded query rows come out as zeros from the packed backends and as attention over real keys from
"masked"; real rows agree to dtype tolerance. `SPIDR_FAST_ATTENTION` forces a backend (it still
falls back to "masked" where the forced one cannot run). The op "attention" of `_dispatch.use_fused`:
its fused path is the packed backends, its reference `self_attention_ref` ("masked"), so
`SPIDR_FAST_BACKEND=reference` (or "attention" in `SPIDR_FAST_REFERENCE_OPS`) runs "masked" only.

Dense backends, for a batch with nothing padded (the training case: the trainer crops every
utterance of a batch to one length), chosen per call (`dense_backend`) on CUDA fp16/bf16 inputs:
- "sdpa_cudnn", "sdpa_flash": SDPA with that backend first (`sdpa_kernel(..., set_priority=True)`,
  then SDPA's others as fallbacks, so a shape the first cannot take still runs); dropout, backward.
- "flash_attn": flash-attn 2's `flash_attn_func` (dropout, backward).
- "flash_attn_3" (`flash_attn_interface`, Hopper only), "flash_attn_4" (`flash_attn.cute`, Hopper
  and newer): no dropout, forward only (opaque custom ops): calls without dropout or gradient (the
  teacher, extraction), where their package imports.
- "sdpa": plain SDPA, PyTorch's own choice (flash by default: it does not prefer cuDNN even on
  Hopper). The reference, and what CPU, fp32 and older GPUs run.
The first backend of the device's row of `DENSE_ORDER` (by compute capability) that can run the call
is taken; `SPIDR_FAST_DENSE_ATTENTION` forces one (it still falls back to "sdpa" where the forced one
cannot run the call: fp32, dropout or a gradient for the forward-only ones). The same dispatch rule
as the padded backends: `SPIDR_FAST_BACKEND=reference` (or "attention" in `SPIDR_FAST_REFERENCE_OPS`)
runs "sdpa" only.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from spidr_fast.kernels import _dispatch

BACKENDS = ("flash_attn_4", "flash_attn", "nested", "masked")
PACKED = BACKENDS[:-1]
FLASH_DTYPES = (torch.float16, torch.bfloat16)
DENSE_BACKENDS = ("flash_attn_4", "flash_attn_3", "flash_attn", "sdpa_cudnn", "sdpa_flash", "sdpa")
FORWARD_ONLY = ("flash_attn_4", "flash_attn_3")  # no dropout; spidr_fast calls their forward only

# The dense backends' default order per device: the first row whose compute capability the device
# reaches, then the first backend of that row that is installed and can run the call ("sdpa" last).
# ASSUMED, not measured on spidr_fast yet: a default until a `make gpu-check` run replaces it
# (bench/attention_backends.py prints, per dropout, the fastest dense backend beside this choice).
DENSE_ORDER: tuple[tuple[tuple[int, int], tuple[str, ...]], ...] = (
    ((10, 0), ("flash_attn_4", "sdpa_cudnn", "sdpa_flash", "flash_attn")),  # Blackwell
    ((9, 0), ("flash_attn_3", "flash_attn_4", "sdpa_cudnn", "sdpa_flash", "flash_attn")),  # Hopper
    ((8, 0), ("sdpa_flash", "flash_attn")),  # Ampere, Ada
    ((0, 0), ()),  # older: PyTorch's own choice
)
_SDPA_BACKENDS = {"sdpa_cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa_flash": SDPBackend.FLASH_ATTENTION}
# SDPA's fallbacks after the chosen backend, in this order (math last: it runs anything).
_SDPA_FALLBACKS = (
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
)
# `sdpa_kernel(set_priority=)` (torch >= 2.6); without it the chosen SDPA backend is the only one enabled.
_SET_PRIORITY = "set_priority" in inspect.signature(sdpa_kernel).parameters


@functools.cache
def _flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


@functools.cache
def _flash_attn_4_varlen():
    try:
        from flash_attn.cute import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


@functools.cache
def _flash_attn_dense():
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


@functools.cache
def _flash_attn_3_dense():
    try:
        from flash_attn_interface import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


@functools.cache
def _flash_attn_4_dense():
    try:
        from flash_attn.cute import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


def _compute_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _forced(variable: str, names: tuple[str, ...]) -> str | None:
    forced = os.environ.get(variable) or None
    if forced is not None and forced not in names:
        raise ValueError(f"{variable} must be one of {names}, got {forced!r}")
    return forced


def packed_backends(device: torch.device) -> tuple[str, ...]:
    """The packed backends usable on `device`, in order of preference; none where `_dispatch.use_fused`
    keeps "attention" on its reference. `SPIDR_FAST_ATTENTION` forces one (on any device)."""
    forced = _forced("SPIDR_FAST_ATTENTION", BACKENDS)
    if forced == "masked" or not _dispatch.use_fused(device, "attention", requested=forced is not None):
        return ()
    if forced is not None:
        return (forced,)
    if device.type != "cuda":
        return ()
    found = []
    if _flash_attn_4_varlen() is not None and _compute_capability(device) >= (9, 0):
        found.append("flash_attn_4")
    if _flash_attn_varlen() is not None:
        found.append("flash_attn")
    return (*found, "nested")


@dataclasses.dataclass(frozen=True, eq=False)
class Padding:
    """A padded batch's real frames, computed once per batch and passed to every layer."""

    mask: Tensor  # (B, T) bool, True on real frames (a prefix of each row)
    backends: tuple[str, ...] = ()  # packed backends the metadata below was built for
    cu_seqlens: Tensor | None = None  # (B + 1,) int32 cumulative real lengths
    indices: Tensor | None = None  # (N,) int64 flat positions b * T + t of the real frames

    @classmethod
    def from_mask(cls, mask: Tensor) -> Padding:
        """Call outside compiled layers: the packed metadata costs a host sync (`nonzero`). Inside a
        compiled region (whole-model compile) it is skipped and attention runs masked SDPA."""
        backends = () if torch.compiler.is_compiling() else packed_backends(mask.device)
        if not backends:
            return cls(mask)
        cu_seqlens = F.pad(mask.sum(-1).cumsum(0), (1, 0)).to(torch.int32)
        return cls(mask, backends, cu_seqlens, mask.flatten().nonzero().squeeze(1))

    def pack(self, x: Tensor) -> Tensor:
        """(B, H, T, Dh) -> (N, H, Dh), the real frames only."""
        return x.transpose(1, 2).flatten(0, 1).index_select(0, self.indices)

    def unpack(self, packed: Tensor, batch: int, seq: int) -> Tensor:
        """(N, H, Dh) -> (B, H, T, Dh), zeros on padded frames."""
        out = packed.new_zeros(batch * seq, *packed.shape[1:]).index_copy_(0, self.indices, packed)
        return out.view(batch, seq, *packed.shape[1:]).transpose(1, 2)


def select_backend(padding: Padding, q: Tensor, dropout_p: float) -> str:
    """The first of the padding's packed backends that runs this call, else "masked"."""
    half = q.dtype in FLASH_DTYPES
    for name in padding.backends:
        if name == "flash_attn_4" and half and dropout_p == 0.0 and not (torch.is_grad_enabled() and q.requires_grad):
            return name
        if name == "flash_attn" and half:
            return name
        if name == "nested":
            return name
    return "masked"


def dense_order(capability: tuple[int, int]) -> tuple[str, ...]:
    """The default order of the dense backends on a device of this compute capability (`DENSE_ORDER`)."""
    return next(order for minimum, order in DENSE_ORDER if capability >= minimum)


def _dense_installed(name: str, capability: tuple[int, int]) -> bool:
    if name == "flash_attn":
        return _flash_attn_dense() is not None
    if name == "flash_attn_3":  # built for sm_90 only
        return capability[0] == 9 and _flash_attn_3_dense() is not None
    if name == "flash_attn_4":
        return capability >= (9, 0) and _flash_attn_4_dense() is not None
    return True


def _constant_result(fn):
    """`torch.compiler.assume_constant_result` (dynamo calls `fn` eagerly while tracing and bakes in its result)
    without importing torch._dynamo here: that imports triton, which must not come before a test sets
    TRITON_INTERPRET=1 (tests/kernels/conftest.py). The decorator sets this mark and nothing else."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_result
def _installed_dense_order(device: torch.device) -> tuple[str, ...]:
    """The device's `DENSE_ORDER` row less the backends not installed. Run eagerly even inside a compiled
    layer (its result a constant): dynamo cannot trace the import of a package that is not there."""
    capability = _compute_capability(device)
    return tuple(name for name in dense_order(capability) if _dense_installed(name, capability))


def _dense_runs(name: str, device: torch.device, dtype: torch.dtype, dropout_p: float, grad: bool) -> bool:
    """Whether dense backend `name` takes this call."""
    if name == "sdpa":
        return True
    if name == "sdpa_flash" and device.type == "cpu":  # SDPA's CPU flash kernel: fp32 too, but no dropout
        return dropout_p == 0.0
    if dtype not in FLASH_DTYPES:
        return False
    if name in FORWARD_ONLY:
        return dropout_p == 0.0 and not grad
    return name != "sdpa_cudnn" or device.type == "cuda"


def choose_dense_backend(device: torch.device, dtype: torch.dtype, dropout_p: float, grad: bool) -> str:
    """The dense backend (`DENSE_BACKENDS`) of an unpadded call (`grad`: a gradient is recorded): forced by
    `SPIDR_FAST_DENSE_ATTENTION` (on any device), else the first of the device's `DENSE_ORDER` row that is
    installed and takes the call; "sdpa" on CPU, for fp32, and where `_dispatch.use_fused` keeps "attention"
    on its reference."""
    forced = _forced("SPIDR_FAST_DENSE_ATTENTION", DENSE_BACKENDS)
    if forced == "sdpa" or not _dispatch.use_fused(device, "attention", requested=forced is not None):
        return "sdpa"
    if forced is not None:
        return forced if _dense_runs(forced, device, dtype, dropout_p, grad) else "sdpa"
    if device.type != "cuda":
        return "sdpa"
    for name in _installed_dense_order(device):
        if _dense_runs(name, device, dtype, dropout_p, grad):
            return name
    return "sdpa"


def dense_backend(q: Tensor, dropout_p: float) -> str:
    """`choose_dense_backend` for this call's q."""
    return choose_dense_backend(q.device, q.dtype, dropout_p, torch.is_grad_enabled() and q.requires_grad)


def _sdpa_backends(backend: str, strict: bool):
    """`sdpa_kernel` with SDPA backend `backend` first, then SDPA's others as fallbacks (unless `strict`)."""
    first = _SDPA_BACKENDS[backend]
    if strict or not _SET_PRIORITY:
        return sdpa_kernel([first])
    return sdpa_kernel([first, *(b for b in _SDPA_FALLBACKS if b != first)], set_priority=True)


def self_attention_ref(
    q: Tensor, k: Tensor, v: Tensor, padding: Padding | None = None, dropout_p: float = 0.0
) -> Tensor:
    """SDPA with a broadcast (B, 1, 1, T) key mask (no mask at all when nothing is padded)."""
    mask = None if padding is None else padding.mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def _missing(backend: str, package: str) -> RuntimeError:
    return RuntimeError(f"attention backend {backend!r} needs the {package} package (pip install {package})")


def _attention_flash_attn(q: Tensor, k: Tensor, v: Tensor, padding: Padding, dropout_p: float) -> Tensor:
    flash_attn_varlen_func = _flash_attn_varlen()
    if flash_attn_varlen_func is None:
        raise _missing("flash_attn", "flash-attn")
    batch, _, seq, _ = q.shape
    q, k, v, cu = padding.pack(q), padding.pack(k), padding.pack(v), padding.cu_seqlens
    out = flash_attn_varlen_func(q, k, v, cu, cu, seq, seq, dropout_p=dropout_p)
    return padding.unpack(out, batch, seq)


@torch.library.custom_op("spidr_fast::flash_attn_4_varlen", mutates_args=())
def _flash_attn_4_op(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
    """FA4's forward on packed (N, H, Dh) frames, opaque to torch.compile (its CuTe DSL cannot be traced)."""
    flash_attn_varlen_func = _flash_attn_4_varlen()
    if flash_attn_varlen_func is None:
        raise _missing("flash_attn_4", "flash-attn-4")
    out = flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)
    return (out[0] if isinstance(out, tuple) else out).contiguous()  # (out, lse) in recent versions


@_flash_attn_4_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
    return torch.empty_like(q)


def _attention_flash_attn_4(q: Tensor, k: Tensor, v: Tensor, padding: Padding) -> Tensor:
    batch, _, seq, _ = q.shape
    out = _flash_attn_4_op(padding.pack(q), padding.pack(k), padding.pack(v), padding.cu_seqlens, seq)
    return padding.unpack(out, batch, seq)


def _attention_nested(q: Tensor, k: Tensor, v: Tensor, padding: Padding, dropout_p: float) -> Tensor:
    batch, _, seq, _ = q.shape
    offsets = padding.cu_seqlens.long()

    def nested(x: Tensor) -> Tensor:  # (N, H, Dh) -> nested (B, H, T_b, Dh)
        return torch.nested.nested_tensor_from_jagged(padding.pack(x), offsets, max_seqlen=seq).transpose(1, 2)

    out = F.scaled_dot_product_attention(nested(q), nested(k), nested(v), dropout_p=dropout_p)
    return padding.unpack(out.transpose(1, 2).values(), batch, seq)


@torch.library.custom_op("spidr_fast::flash_attn_dense_fwd", mutates_args=())
def _flash_attn_dense_fwd(q: Tensor, k: Tensor, v: Tensor, version: int) -> Tensor:
    """FlashAttention-3's or -4's forward on (B, T, H, Dh), opaque to torch.compile."""
    flash_attn_func = _flash_attn_3_dense() if version == 3 else _flash_attn_4_dense()
    if flash_attn_func is None:
        package = "flash-attn-3 (flash_attn_interface)" if version == 3 else "flash-attn-4"
        raise _missing(f"flash_attn_{version}", package)
    out = flash_attn_func(q, k, v)
    return (out[0] if isinstance(out, tuple) else out).contiguous()  # (out, lse) in some versions


@_flash_attn_dense_fwd.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, version: int) -> Tensor:
    return q.new_empty(q.shape)


def dense_attention(
    q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0, backend: str | None = None, *, strict: bool = False
) -> Tensor:
    """Attention over an unpadded batch on dense backend `backend` (default: `dense_backend`'s choice).

    strict: an SDPA backend runs alone, without SDPA's fallbacks (a benchmark's view: an error rather
    than another kernel where it cannot take the call).
    """
    backend = backend or dense_backend(q, dropout_p)
    if backend in _SDPA_BACKENDS:
        with _sdpa_backends(backend, strict):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    if backend == "flash_attn":
        flash_attn_func = _flash_attn_dense()
        if flash_attn_func is None:
            raise _missing("flash_attn", "flash-attn")
        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p).transpose(
            1, 2
        )
    if backend in FORWARD_ONLY:
        if dropout_p:
            raise ValueError(f"attention backend {backend!r} has no dropout, got dropout_p={dropout_p}")
        version = int(backend[-1])
        return _flash_attn_dense_fwd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), version).transpose(1, 2)
    if backend != "sdpa":
        raise ValueError(f"unknown dense attention backend {backend!r}; known: {DENSE_BACKENDS}")
    return self_attention_ref(q, k, v, None, dropout_p)


def self_attention(q: Tensor, k: Tensor, v: Tensor, padding: Padding | None = None, dropout_p: float = 0.0) -> Tensor:
    """Multi-head attention over the real frames of each utterance, with dropout.

    Args:
        q, k, v: (B, H, T, Dh), any float dtype.
        padding: the batch's `Padding`, or None when no frame is padded (then a dense backend runs).
        dropout_p: attention dropout probability (0 in eval).
    Returns:
        (B, H, T, Dh); padded query rows are zeros (packed backends) or attend to real keys (masked).
    """
    if padding is None:  # nothing padded: the dense backends
        return dense_attention(q, k, v, dropout_p)
    backend = select_backend(padding, q, dropout_p)
    if backend == "flash_attn_4":
        return _attention_flash_attn_4(q, k, v, padding)
    if backend == "flash_attn":
        return _attention_flash_attn(q, k, v, padding, dropout_p)
    if backend == "nested":
        return _attention_nested(q, k, v, padding, dropout_p)
    return self_attention_ref(q, k, v, padding, dropout_p)
