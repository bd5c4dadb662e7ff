"""Roofline predictor: where a training step's (or an extraction forward's) time goes on A100/H100/H200.

No GPU needed. The step runs for real on `meta` tensors at the real batch: every aten op is dispatched
with its true shapes, dtypes and strides, nothing is computed, and each op is recorded with
  * FLOPs: torch's formulas corrected and completed by the trainer's own `FLOP_FORMULAS`
    (spidr_fast/train/flops.py): a grouped conv's weight gradient counted once, not `groups` times;
    attention (flash / memory-efficient SDPA and its backward); the fused custom ops;
  * bytes: distinct input storages read + outputs written (a broadcast dim counted once);
  * its class (the kind of kernel it launches: `CLASSES`) and its region (the module that ran it, carried
    to the backward through the autograd node).
Time per op = max(FLOPs / (eff x peak), bytes / (eff_mem x HBM bandwidth), instructions / (eff_issue x issue
rate)), at least `kernel_min_s` per kernel, with every efficiency in ONE table, `EFFICIENCY`, each with where it
came from. The issue rate is SMs x 4 schedulers x boost clock x 32 lanes (spidr_fast/devices.py); the instructions
per element of each Triton kernel and elementwise op come from its sm_90 SASS (`ISSUE_INSTRUCTIONS`,
bench/sass_per_element.py): an exact-erf GELU or a LayerNorm can take longer to issue than to move its bytes.

What the trace emulates of a CUDA run (the CPU build has no CUDA autocast):
  * bf16 autocast: the GEMM/conv/SDPA family in bf16, LayerNorm/GroupNorm/softmax/sum in fp32, leaf
    weights cast once per forward (autocast's cast cache);
  * SDPA: the flash backend when no mask is passed, memory-efficient with an additive bias otherwise;
    dropout as one fused `native_dropout`;
  * spidr_fast's ops take their Triton path (as on CUDA) unless `SPIDR_FAST_REFERENCE_OPS` lists them;
  * cuDNN's layout choice (a channels-last conv input gives a channels-last output) and the hidden
    `.contiguous()` copy of an eager LayerNorm given a non-contiguous input (serial helper-kernel time);
  * "compiled": runs of consecutive fusible ops (not GEMM, conv, attention, custom or multi-tensor ops)
    inside one compiled region become one kernel per reduction that moves only the values crossing the
    run's boundary. spidr_fast's regions are its trainer's, `COMPILED_REGIONS` of
    spidr_fast/train/parallelize.py (each transformer layer, and the glue regions between them); the
    reference 0.2.0 compiles the whole model (fwd + bwd; optimizer and EMA stay eager).
Limits: efficiencies are assumptions until `make gpu-check` calibrates them; the fusion estimate keeps
eager's saved-for-backward set (Inductor may recompute instead: compiled traffic is an upper bound); no
host time (no host syncs in either step), no communication (one GPU).
MFU = the step's model FLOPs (forward + backward, counted as the trainer counts them) / time / bf16 peak;
all variants of one config are measured against the same FLOPs (those of spidr_fast's phase-A step).

    python bench/roofline.py                                  # spidr_fast, base, 16 x 15 s, all devices
    python bench/roofline.py --compare spidr_fast reference   # side by side (all devices unless --device)
    python bench/roofline.py --compare spidr_fast spidr_fast:ref_ops=conv_frontend --json out.json
    python bench/roofline.py --device H100 --levers --eff conv_grouped=0.4     # built levers; an efficiency what-if
Variant: `spidr_fast` | `reference`, then `:eager`, `:whole` (spidr_fast compiled as one graph, glue
included, as the reference), `:layers` (spidr_fast with its layers compiled, not its glue: the trainer's
run.compile_glue=false), `:ref_ops=a+b` (SPIDR_FAST_REFERENCE_OPS),
`:frozen` (phase B: extractor frozen, no EMA), `:extract` (extraction forward), `:ncw` (what-if: cuDNN wraps
every channels-first bf16 conv in NCW <-> NHWC transposes, which a GPU profile shows or not). For the GPU check:
`predict(config, device)` gives predicted ms per class and `classify(kernel_name)` maps a profiler kernel
name onto the same classes.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry, shape_wrapper

from spidr_fast.train.flops import FLOP_FORMULAS
from spidr_fast.train.parallelize import COMPILED_REGIONS, LAYER_REGIONS, region_paths

sys.path.insert(0, str(Path(__file__).resolve().parent))
from roofline_classes import (  # noqa: F401  (re-exported)
    CLASSES,
    GEMM_OPS,
    KERNEL_RULES,
    REDUCTION_WORDS,
    REGIONS,
    SCOPE,
    VIEW_OPS,
    classify,
    kernel_classes,
    op_class,
    region_of,
)
from roofline_tables import DEVICES, EFFICIENCY, ISSUE_INSTRUCTIONS, ISSUE_KERNELS, ISSUE_SOURCE, device_peaks

# ------------------------------------------------------------------------------------------------
# Tracing: CUDA-like dispatch (autocast, SDPA backend, dropout) above autograd, a recorder below it
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Op:
    name: str
    cls: str
    region: str
    phase: str  # fwd | bwd | loss | opt | ema
    label: str  # module path (forward) or that of the forward op a backward op differentiates
    flops: int
    low_precision: bool  # the op's floating inputs are bf16/fp16 (tensor-core peak) rather than fp32
    bytes: int  # moved by the op's own kernel(s)
    extra: int  # moved by helper kernels around it (layout transposes, hidden .contiguous() copies): serial
    kernels: int
    groups: int
    ins: list[int]  # value ids read
    outs: list[int]  # value ids written
    elements: int = 0  # of its largest tensor (read or written): the unit of ISSUE_INSTRUCTIONS


FORMULAS = {**flop_registry, **{k: shape_wrapper(v) for k, v in FLOP_FORMULAS.items()}}
_LOWER = {F.linear, F.conv1d, torch.conv1d, torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.mm, Tensor.mm,
          torch.bmm, Tensor.bmm, torch.baddbmm, torch.addmm, torch.einsum}  # fmt: skip
_FP32 = {F.layer_norm, torch.layer_norm, F.group_norm, torch.group_norm, torch.cdist, F.normalize, torch.exp,
         Tensor.exp, torch.log, Tensor.log, torch.rsqrt, Tensor.rsqrt, torch.pow, Tensor.pow,
         torch.logsumexp}  # fmt: skip
_FP32_UNLESS_DTYPE = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, Tensor.softmax, Tensor.log_softmax,
                      torch.sum, Tensor.sum, torch.cumsum, Tensor.cumsum}  # fmt: skip


class _State:
    autocast = False
    cast_cache: dict[int, Tensor] = {}  # noqa: RUF012
    modules: list[str] = []  # noqa: RUF012  (stack of module paths being run)
    node_labels: dict[Any, str] = {}  # noqa: RUF012  (autograd node -> forward label)
    phase = "fwd"
    suppress = 0  # > 0: ops are not recorded (layout fix-ups that stand for what cuDNN does inside its kernels)
    ncw_transposes = False  # what-if: cuDNN wraps channels-first bf16 convs in NCW <-> NHWC transposes


class _EmulatedAutocast(contextlib.ContextDecorator):
    """Stands in for torch.autocast during a trace (the CPU build refuses device 'cuda', meta has none)."""

    def __init__(self, device_type: str = "cuda", dtype: torch.dtype | None = None, enabled: bool = True, **_: Any):
        self.enabled = enabled

    def __enter__(self) -> _EmulatedAutocast:
        self.prev, _State.autocast = _State.autocast, self.enabled
        return self

    def __exit__(self, *exc: object) -> None:
        _State.autocast = self.prev
        if not _State.autocast:
            _State.cast_cache.clear()


def _cast(x: Any, dtype: torch.dtype) -> Any:
    if isinstance(x, (list, tuple)):
        return type(x)(_cast(y, dtype) for y in x)
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dtype == dtype:
        return x
    if x.is_leaf and x.requires_grad:  # autocast casts a weight once per region
        if id(x) not in _State.cast_cache:
            _State.cast_cache[id(x)] = x.to(dtype)
        return _State.cast_cache[id(x)]
    return x.to(dtype)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
          is_causal: bool = False, scale: float | None = None, **_: Any) -> Tensor:  # fmt: skip
    """SDPA as CUDA runs it: flash without a mask, memory-efficient with an additive bias otherwise."""
    if _State.autocast:
        q, k, v = (_cast(t, torch.bfloat16) for t in (q, k, v))
    aten = torch.ops.aten
    if attn_mask is None:
        return aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False, scale=scale)[0]
    bias = attn_mask
    if bias.dtype == torch.bool:
        bias = torch.zeros((), dtype=q.dtype, device=q.device).masked_fill(~bias, float("-inf"))
    bias = bias.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, dropout_p, is_causal, scale=scale)[0]


def _tag(out: Any) -> None:
    """Label the autograd nodes that produced `out` (and any unlabelled ones behind them) with the module."""
    label = _State.modules[-1] if _State.modules else ""
    stack = [t.grad_fn for t in tree_flatten(out)[0] if isinstance(t, Tensor) and t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in _State.node_labels:
            continue
        _State.node_labels[node] = label
        stack.extend(n for n, _ in node.next_functions)


class _CudaLike(TorchFunctionMode):
    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention):
            out = _sdpa(*args, **kwargs)
        elif func is F.dropout:  # CUDA: one fused kernel writing the output and a bool mask
            p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
            training = kwargs.get("training", args[2] if len(args) > 2 else True)
            out = torch.ops.aten.native_dropout(args[0], p, training)[0] if training and p > 0 else args[0]
        else:
            if _State.autocast:
                if func in _LOWER:
                    args, kwargs = (
                        _cast(args, torch.bfloat16),
                        {k: _cast(v, torch.bfloat16) for k, v in kwargs.items()},
                    )
                elif func in _FP32:
                    args, kwargs = _cast(args, torch.float32), {k: _cast(v, torch.float32) for k, v in kwargs.items()}
                elif func in _FP32_UNLESS_DTYPE and kwargs.get("dtype") is None:
                    kwargs = {**kwargs, "dtype": torch.float32}
            out = func(*args, **kwargs)
            if func in (F.conv1d, torch.conv1d) and _is_channels_last(args[0]):
                _State.suppress += 1  # cuDNN: a channels-last input gives a channels-last output (meta: NCW)
                out = out.transpose(1, 2).contiguous().transpose(1, 2)
                _State.suppress -= 1
        _tag(out)
        return out


def _is_channels_last(t: Tensor) -> bool:
    return t.dim() == 3 and t.shape[1] > 1 and t.stride(1) == 1


def _ubytes(t: Tensor) -> int:
    """Bytes of the distinct elements of `t` (stride-0 dims counted once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _tensors(x: Any) -> list[Tensor]:
    return [t for t in tree_flatten(x)[0] if isinstance(t, Tensor)]


class _Recorder(TorchDispatchMode):
    """Records every op below autograd: FLOPs, bytes, class, region, and the values it reads and writes."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[Op] = []
        self.value_of: dict[int, int] = {}  # storage -> current value id (a new one after each write)
        self.value_bytes: list[int] = []
        self.alive: list[Tensor] = []  # keeps storages alive: a freed address must not alias a new value

    def _value(self, t: Tensor, write: bool) -> int:
        key = t.untyped_storage()._cdata
        if write or key not in self.value_of:
            self.value_of[key] = len(self.value_bytes)
            self.value_bytes.append(0)
        v = self.value_of[key]
        self.value_bytes[v] = max(self.value_bytes[v], _ubytes(t))
        return v

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if _State.suppress:
            return out
        packet = func._overloadpacket
        name = packet.__name__
        if func.namespace == "spidr_fast":
            name = f"spidr_fast::{name}"
        elif func.namespace not in ("aten", "prims") or name in VIEW_OPS:
            return out
        self.alive.extend(_tensors((args, kwargs, out)))
        ins, outs = _tensors((args, kwargs)), _tensors(out)
        if name.endswith("_") and not outs:  # in-place multi-tensor ops: their first list is written
            outs = _tensors(args[0])
        if name == "_fused_adamw_":  # params, exp_avg, exp_avg_sq
            outs = _tensors(args[0]) + _tensors(args[2]) + _tensors(args[3])
        distinct_in = {t.untyped_storage()._cdata: t for t in ins}
        distinct_out = {t.untyped_storage()._cdata: t for t in outs}
        written_only = name in ("copy_", "fill_", "zero_") and args and isinstance(args[0], Tensor)
        nbytes = sum(_ubytes(t) for k, t in distinct_in.items() if not (written_only and t is args[0]))
        nbytes += sum(_ubytes(t) for t in distinct_out.values())
        in_values = [self._value(t, False) for t in distinct_in.values()]
        out_values = [self._value(t, True) for t in distinct_out.values()]
        formula = FORMULAS.get(packet)
        flops = int(formula(*args, **kwargs, out_val=out)) if formula is not None else 0
        low = any(t.dtype in (torch.bfloat16, torch.float16) for t in ins if t.is_floating_point())
        node = torch._C._current_autograd_node()
        label = _State.node_labels.get(node, "") if node is not None else (_State.modules or [""])[-1]
        kernels, groups, extra = 1, 1, 0
        if name == "convolution":
            groups = args[-1]
            if _State.ncw_transposes and low and args[0].shape[1] > 1 and not _is_channels_last(args[0]):
                extra += 2 * (_ubytes(args[0]) + _ubytes(out))  # NCW -> NHWC input, NHWC -> NCW output
                kernels += 2
        elif name == "convolution_backward":
            groups, kernels = args[-2], max(1, sum(bool(m) for m in args[-1]))
            if _State.ncw_transposes and low and args[1].shape[1] > 1 and not _is_channels_last(args[1]):
                extra += 2 * (_ubytes(args[0]) + _ubytes(args[1]) + (_ubytes(out[0]) if args[-1][0] else 0))
                kernels += 3
        elif name == "native_layer_norm" and not args[0].is_contiguous():
            extra += 2 * _ubytes(args[0])  # layer_norm_cuda: X.contiguous(), a copy kernel
            kernels += 1
        elif name == "native_layer_norm_backward":
            kernels = 2  # the input gradient, then gamma/beta gradients
            for t in args[:2]:  # dY and X made contiguous
                if not t.is_contiguous():
                    extra, kernels = extra + 2 * _ubytes(t), kernels + 1
        elif name == "spidr_fast::pos_conv_backward":  # dz = LN-GELU backward: written, read by grad_x and grad_w
            extra, kernels = 3 * _ubytes(args[1]), 3
        elif "attention_backward" in name:
            kernels = 3  # preprocess, the backward kernel, dq conversion
        elif op_class(name) == "optimizer/EMA":
            lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], Tensor)]
            kernels = max(1, math.ceil(len(lists[0]) / 48)) if lists else 1  # multi_tensor_apply chunks
        elements = max((_ubytes(t) // t.element_size() for t in (*distinct_in.values(), *distinct_out.values())),
                       default=0)  # fmt: skip
        self.ops.append(Op(name, op_class(name), region_of(label, _State.phase), _State.phase, label, flops, low,
                           nbytes, extra, kernels, groups, in_values, out_values, elements))  # fmt: skip
        return out


@contextlib.contextmanager
def _cuda_like_trace(model: nn.Module | None, use_triton: bool) -> Iterator[_Recorder]:
    """Module-path hooks, emulated autocast, CUDA dispatch decisions; yields the recorder."""
    from torch.nn.modules import module as module_mod

    _State.modules, _State.node_labels, _State.cast_cache, _State.phase = [], {}, {}, "fwd"
    names = {id(m): n for n, m in model.named_modules()} if model is not None else {}

    def pre(mod: nn.Module, _: Any) -> None:
        top, name = _State.modules[-1] if _State.modules else "", names.get(id(mod))
        scope = top.rpartition(SCOPE)[0]  # inside a compiled method (`_scoped`): its path prefixes the label
        _State.modules.append(top if name is None else f"{scope}{SCOPE}{name}" if scope else name)

    def post(*_: Any) -> None:
        if _State.modules:
            _State.modules.pop()

    patched = [(torch, "autocast", _EmulatedAutocast),
               (torch, "is_autocast_enabled", lambda *a: _State.autocast),
               (torch, "get_autocast_dtype", lambda *a: torch.bfloat16)]  # fmt: skip
    from spidr_fast.kernels import _dispatch

    def on_cuda(device: torch.device, op: str, *, requested: bool = False) -> bool:  # `use_fused` on CUDA
        return use_triton and _dispatch.forced_backend() != "reference" and op not in _dispatch.reference_ops()

    patched.append((_dispatch, "use_fused", on_cuda))  # every op asks `_dispatch.use_fused`
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in patched]
    hooks = [module_mod.register_module_forward_pre_hook(pre), module_mod.register_module_forward_hook(post)]
    try:
        for obj, attr, new in patched:
            setattr(obj, attr, new)
        with _CudaLike(), _Recorder() as rec:
            yield rec
    finally:
        for h in hooks:
            h.remove()
        for obj, attr, old in saved:
            setattr(obj, attr, old)
        _State.autocast, _State.cast_cache, _State.ncw_transposes = False, {}, False


@dataclasses.dataclass
class Trace:
    ops: list[Op]
    value_bytes: list[int]
    audio_s: float
    compiled: Callable[[Op], str | None] | None  # the fusion region of an op, None: eager
    model_flops: int  # forward + backward FLOPs, as the trainer counts them
    dense_attention: bool = False  # spidr_fast's per-device dense attention backend (else PyTorch's flash SDPA)


def trace_fn(fn: Callable[[], Any], model: nn.Module | None = None, *, autocast: bool = False) -> list[Op]:
    """Record the ops `fn()` runs (on meta tensors, or any tensors: it really runs)."""
    with _cuda_like_trace(model, use_triton=True) as rec, _EmulatedAutocast(enabled=autocast):
        fn()
    return rec.ops


# ------------------------------------------------------------------------------------------------
# One training step or extraction forward of a variant, on meta tensors
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Variant:
    impl: str = "spidr_fast"  # spidr_fast | reference
    compiled: bool = True
    whole_model: bool = False  # spidr_fast compiled as one graph (forward + backward), not by regions
    glue: bool = True  # spidr_fast's glue regions compiled (parallelize.GLUE_REGIONS), not its layers only
    ref_ops: str = ""  # SPIDR_FAST_REFERENCE_OPS for the trace
    mode: str = "train"  # train (phase A) | frozen (phase B) | extract
    ncw_transposes: bool = False  # what-if: cuDNN transposes channels-first bf16 conv operands (PERF-MODEL.md)

    @classmethod
    def parse(cls, spec: str) -> Variant:
        impl, *opts = spec.split(":")
        if impl not in ("spidr_fast", "reference"):
            raise ValueError(f"variant {spec!r}: the implementation must be spidr_fast or reference")
        kw: dict[str, Any] = {"impl": impl}
        for opt in opts:
            if opt == "eager":
                kw["compiled"] = False
            elif opt == "whole":
                kw["whole_model"] = True
            elif opt == "layers":
                kw["glue"] = False
            elif opt in ("frozen", "extract"):
                kw["mode"] = opt
            elif opt == "ncw":
                kw["ncw_transposes"] = True
            elif opt.startswith("ref_ops="):
                kw["ref_ops"] = opt.split("=", 1)[1].replace("+", ",")
            else:
                known = "eager, whole, layers, frozen, extract, ncw, ref_ops=a+b"
                raise ValueError(f"variant {spec!r}: unknown option {opt!r} ({known})")
        return cls(**kw)

    def __str__(self) -> str:
        opts = [] if self.compiled else ["eager"]
        opts += ["whole"] if self.whole_model and self.impl == "spidr_fast" else []
        opts += ["layers"] if not self.glue and self.impl == "spidr_fast" else []
        opts += [] if self.mode == "train" else [self.mode]
        opts += ["ncw"] if self.ncw_transposes else []
        opts += [f"ref_ops={self.ref_ops.replace(',', '+')}"] if self.ref_ops else []
        return ":".join([self.impl, *opts])


def load_config(config: Any = "base") -> Any:
    """A spidr_fast SpidRConfig: itself, a preset name (base, tiny) or a TOML/JSON path."""
    from spidr_fast import SpidRConfig, read_model_config

    if isinstance(config, str):
        if config == "base":
            return SpidRConfig()
        path = config
        if not os.path.exists(path):
            path = os.path.join(os.path.dirname(__import__("spidr_fast").__file__), "configs", f"{config}.toml")
        if not os.path.exists(path):
            raise FileNotFoundError(f"--config {config!r}: neither a file nor a preset in spidr_fast/configs")
        return read_model_config(path)
    return config


def _build(impl: str, cfg: Any) -> nn.Module:
    if impl == "spidr_fast":
        from spidr_fast import DinoSR, DinoSRConfig, SpidR

        cls = SpidR if type(cfg).__name__ == "SpidRConfig" else DinoSR
        assert isinstance(cfg, DinoSRConfig)
    else:
        import spidr.config as rc
        from spidr.models import DinoSR as RefDinoSR
        from spidr.models import SpidR as RefSpidR

        ref_cfg_cls = rc.SpidRConfig if type(cfg).__name__ == "SpidRConfig" else rc.DinoSRConfig
        cls = RefSpidR if ref_cfg_cls is rc.SpidRConfig else RefDinoSR
        cfg = ref_cfg_cls(**dataclasses.asdict(cfg))
    with torch.device("meta"):
        model = cls(cfg)
    return model.to("meta")  # legacy constructors may ignore the device context


def _frames(cfg: Any, samples: int) -> int:
    for _, kernel, stride in cfg.extractor_conv_layer_config:
        samples = (samples - kernel) // stride + 1
    return samples


def _optimizer_step(params: list[Tensor], grad_scaler: bool) -> None:
    """clip_grad_norm_ + fused AdamW (+ GradScaler's unscale for the reference's trainer), as the trainers do."""
    grads = [p.grad for p in params if p.grad is not None]
    params = [p for p in params if p.grad is not None]
    found_inf = torch.zeros((), device="meta")
    if grad_scaler:
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, torch.ones((), device="meta"))
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
    torch._foreach_mul_(grads, torch.clamp(10.0 / (total + 1e-6), max=1.0))
    _State.suppress += 1  # the optimizer's state exists already in a steady-state step
    state = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    steps = [torch.zeros((), device="meta") for _ in params]
    _State.suppress -= 1
    torch._fused_adamw_(params, grads, state[0], state[1], [], steps, lr=5e-4, beta1=0.9, beta2=0.98,
                        weight_decay=0.01, eps=1e-6, amsgrad=False, maximize=False)  # fmt: skip


def _trainer_regions(regions: tuple[str, ...]) -> Callable[[Op], str | None]:
    """The fusion region of an op when spidr_fast's trainer compiles `regions` (parallelize.COMPILED_REGIONS):
    the compiled method whose scope prefixes its label, else the compiled module at or above its label."""
    methods = set(regions)  # a method's scope is its exact path
    modules = re.compile("(?:" + "|".join(re.escape(r).replace(r"\*", r"\d+") for r in regions) + r")(?=\.|$)")

    def region(op: Op) -> str | None:
        if op.phase not in ("fwd", "bwd"):
            return None
        scope, _, label = op.label.rpartition(SCOPE)
        if scope:
            return scope if scope in methods else None
        m = modules.match(label)
        return m.group(0) if m else None

    return region


def _scoped(model: nn.Module, regions: tuple[str, ...]) -> None:
    """Label what each compiled method of `regions` runs with its path (`SCOPE`), as the hooks do for modules."""
    for path, owner, attr in region_paths(model, regions):
        method = getattr(owner, attr)
        if isinstance(method, nn.Module):
            continue

        def scoped(*args: Any, _method: Callable = method, _path: str = path, **kwargs: Any) -> Any:
            _State.modules.append(_path + SCOPE)
            try:
                return _method(*args, **kwargs)
            finally:
                _State.modules.pop()

        setattr(owner, attr, scoped)


def _whole_model(op: Op) -> str | None:
    """The reference's trainer compiles the whole model: forward and backward fuse, optimizer and EMA do not."""
    return op.phase if op.phase in ("fwd", "bwd") else None


def trace(
    variant: Variant | str = "spidr_fast", config: Any = "base", batch: int = 16, seconds: float = 15.0
) -> Trace:
    """One training step (or extraction forward) of `variant` on meta tensors at `batch` x `seconds` audio."""
    variant = Variant.parse(variant) if isinstance(variant, str) else variant
    cfg = load_config(config)
    samples = int(seconds * 16000)
    frames = _frames(cfg, samples)
    saved_env = os.environ.get("SPIDR_FAST_REFERENCE_OPS")
    os.environ["SPIDR_FAST_REFERENCE_OPS"] = variant.ref_ops
    torch.manual_seed(0)
    try:
        model = _build(variant.impl, cfg)
        if variant.impl == "spidr_fast":
            _scoped(model, COMPILED_REGIONS)
        wav = torch.empty(batch, samples, device="meta")
        with _cuda_like_trace(model, use_triton=variant.impl == "spidr_fast") as rec:
            _State.ncw_transposes = variant.ncw_transposes
            if variant.mode == "extract":
                model.eval()
                with torch.no_grad(), _EmulatedAutocast():
                    model.get_intermediate_outputs(wav)
            else:
                model.train()
                if variant.mode == "frozen":
                    for m in (model.feature_extractor, model.feature_projection):
                        m.requires_grad_(False)
                # the reference keeps the same number of masked frames per row: ~52.6% at mask_prob 0.8, span 10
                mask_indices = torch.zeros(batch, int(0.526 * frames), dtype=torch.long, device="meta")
                with _EmulatedAutocast():
                    losses, _ = model(wav, mask_indices=mask_indices)
                _State.phase = "loss"
                loss = losses.float().sum() / mask_indices.numel()
                _State.phase = "bwd"
                loss.backward()
                _State.phase = "opt"
                params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("teacher")]
                with torch.no_grad():
                    _optimizer_step(params, grad_scaler=variant.impl == "reference")
                _State.phase = "ema"
                if variant.mode == "train":
                    with torch.no_grad():
                        _ema(model)
    finally:
        if saved_env is None:
            os.environ.pop("SPIDR_FAST_REFERENCE_OPS", None)
        else:
            os.environ["SPIDR_FAST_REFERENCE_OPS"] = saved_env
    compiled = None
    if variant.compiled:
        regions = COMPILED_REGIONS if variant.glue else LAYER_REGIONS
        per_region = variant.impl == "spidr_fast" and not variant.whole_model
        compiled = _trainer_regions(regions) if per_region else _whole_model
    model_flops = sum(op.flops for op in rec.ops if op.phase in ("fwd", "bwd", "loss"))
    dense = variant.impl == "spidr_fast" and "attention" not in variant.ref_ops.split(",")
    return Trace(rec.ops, rec.value_bytes, batch * samples / 16000, compiled, model_flops, dense)


def _ema(model: nn.Module) -> None:
    """The teacher EMA step at a decay inside (0, 1), the same multi-tensor lerp for both implementations."""
    student = dict(model.student.named_parameters())
    pairs = [(t, student[n]) for n, t in model.teacher.named_parameters() if n in student]
    torch._foreach_lerp_([t for t, _ in pairs], [s.to(t.dtype) for t, s in pairs], 1e-3)


# ------------------------------------------------------------------------------------------------
# The time model
# ------------------------------------------------------------------------------------------------


def _fused_costs(tr: Trace) -> tuple[list[float], list[float], list[float], list[float]]:
    """Per-op (bytes, helper-kernel bytes, kernels, issued thread-instructions) after fusing runs of consecutive
    fusible ops in one compiled region: a run moves the values entering it and those it produces that are read
    elsewhere (or never read: results), and has no helper kernels (Inductor generates its own LayerNorm, reading
    any strides). Its instructions: each member's own less a standalone kernel's loads, stores and indexing (a
    "copy"), plus one such overhead over the run's largest tensor."""
    nbytes = [float(op.bytes) for op in tr.ops]
    extra = [float(op.extra) for op in tr.ops]
    kernels = [float(op.kernels) for op in tr.ops]
    issued = [issue_instructions(op) for op in tr.ops]
    if tr.compiled is None:
        return nbytes, extra, kernels, issued
    readers: dict[int, set[int]] = collections.defaultdict(set)
    for i, op in enumerate(tr.ops):
        for v in op.ins:
            readers[v].add(i)
    runs, run, key = [], [], None
    for i, op in enumerate(tr.ops):
        k = tr.compiled(op)
        fusible = k is not None and op.cls == "norm/elementwise" and not op.name.startswith("spidr_fast::")
        if run and (not fusible or k != key):
            runs.append(run)
            run = []
        if fusible:
            run.append(i)
            key = k
    if run:
        runs.append(run)
    overhead = ISSUE_INSTRUCTIONS["copy"]
    for run in runs:
        members = set(run)
        produced = {v for i in run for v in tr.ops[i].outs}
        entering = {v for i in run for v in tr.ops[i].ins if v not in produced}
        leaving = {v for v in produced if not readers[v] or readers[v] - members}
        moved = sum(tr.value_bytes[v] for v in entering | leaving)
        reductions = sum(any(w in tr.ops[i].name for w in REDUCTION_WORDS) for i in run)
        own = sum(max(0.0, issued[i] - overhead * len(issue_kernels(tr.ops[i])) * tr.ops[i].elements) for i in run)
        fused_issued = own + overhead * max(tr.ops[i].elements for i in run)
        eager = sum(nbytes[i] for i in run) or 1.0
        for i in run:  # the run's traffic, kernels and instructions, shared in proportion to eager traffic
            share = nbytes[i] / eager
            nbytes[i], kernels[i], extra[i] = moved * share, max(1, reductions) * share, 0.0
            issued[i] = fused_issued * share
    return nbytes, extra, kernels, issued


def issue_kernels(op: Op) -> tuple[str, ...]:
    """The `ISSUE_INSTRUCTIONS` rows of the kernels `op` runs (none for GEMM, conv, attention, optimizer/EMA)."""
    if op.name in ISSUE_KERNELS:
        return ISSUE_KERNELS[op.name]
    if op.name in ISSUE_INSTRUCTIONS:
        return (op.name,)
    if op.cls != "norm/elementwise" or op.name.startswith("spidr_fast::"):
        return ()
    return ("sum",) if any(w in op.name for w in REDUCTION_WORDS) else ("add",)


def issue_instructions(op: Op) -> float:
    """Thread-instructions `op`'s kernels execute: `ISSUE_INSTRUCTIONS` per element x its largest tensor's elements."""
    return sum(ISSUE_INSTRUCTIONS[k] for k in issue_kernels(op)) * op.elements


# Compute capability by the family word in a device name: kernels/attention.py's DENSE_ORDER is keyed on it.
CAPABILITY = {"B200": (10, 0), "H100": (9, 0), "H200": (9, 0), "L40S": (8, 9), "A100": (8, 0)}


def dense_attention_key(device: str) -> str:
    """The `EFFICIENCY` key of the dense attention spidr_fast picks on `device`: the first SDPA backend of
    its `DENSE_ORDER` row (no flash-attn package assumed installed); flash SDPA's for an unknown family."""
    from spidr_fast.kernels.attention import dense_order

    capability = next((c for word, c in CAPABILITY.items() if word in device.upper()), (8, 0))
    sdpa = [b for b in dense_order(capability) if b.startswith("sdpa")]
    return "attention_cudnn" if sdpa[:1] == ["sdpa_cudnn"] else "attention"


def efficiency(op: Op, dense_key: str = "attention") -> float:
    """Fraction of the compute peak this op reaches (from `EFFICIENCY`); `dense_key`: that of unmasked SDPA."""
    if op.name.startswith("spidr_fast::pos_conv"):
        return EFFICIENCY["conv_pos_triton"][0]
    if op.cls == "conv":
        return EFFICIENCY["conv_grouped" if op.groups > 1 else "conv"][0]
    if op.cls == "attention":
        return EFFICIENCY["attention_bias" if "efficient" in op.name else dense_key][0]
    if not op.low_precision:
        return EFFICIENCY["gemm_fp32"][0]
    return EFFICIENCY["gemm" if op.flops >= 2e9 else "gemm_small"][0]


def summarize(tr: Trace, device: str = "H100") -> dict[str, Any]:
    """Per-class and per-region FLOPs, bytes, kernels and predicted ms; the step's ms and MFU."""
    hw = device_peaks(device)
    bw = hw["hbm"] * EFFICIENCY["memory"][0]
    nbytes, extra, kernels, issued = _fused_costs(tr)
    issue_rate = hw["issue"] * EFFICIENCY["issue"][0]
    dense_key = dense_attention_key(device) if tr.dense_attention else "attention"
    rows = {c: collections.Counter() for c in CLASSES}
    regions = {r: collections.Counter() for r in REGIONS}
    for op, b, e, k, n in zip(tr.ops, nbytes, extra, kernels, issued):
        t_compute = 0.0
        if op.flops:
            t_compute = op.flops / (hw["bf16" if op.low_precision else "fp32"] * efficiency(op, dense_key))
        t_issue = n / issue_rate
        t = max(t_compute, b / bw, t_issue, k * EFFICIENCY["kernel_min_s"][0]) + e / bw
        for row in (rows[op.cls], regions[op.region]):
            row["gflop"] += op.flops / 1e9
            row["gb"] += (b + e) / 1e9
            row["kernels"] += k
            row["ms"] += t * 1e3
            row["compute_bound_ms"] += t * 1e3 if t_compute >= max(b / bw, t_issue) else 0.0
            row["issue_bound_ms"] += t * 1e3 if t_issue > max(t_compute, b / bw) else 0.0
            row["issue_ms"] += t_issue * 1e3
            row["memory_ms"] += b / bw * 1e3
    total_ms = sum(r["ms"] for r in rows.values())
    return {
        "device": device,
        "classes": {c: dict(r) for c, r in rows.items() if r},
        "regions": {c: dict(r) for c, r in regions.items() if r},
        "ms": total_ms,
        "gflop": sum(op.flops for op in tr.ops) / 1e9,
        "model_gflop": tr.model_flops / 1e9,
        "gb": (sum(nbytes) + sum(extra)) / 1e9,
        "audio_s": tr.audio_s,
        "floor_compute_ms": sum(op.flops / hw["bf16" if op.low_precision else "fp32"] for op in tr.ops) * 1e3,
        "floor_memory_ms": (sum(nbytes) + sum(extra)) / hw["hbm"] * 1e3,
        "floor_issue_ms": sum(issued) / hw["issue"] * 1e3,
    }


def mfu(model_flops: float, ms: float, device: str) -> float:
    return model_flops / (ms / 1e3) / device_peaks(device)["bf16"]


def predict(config: Any = "base", device: str = "H100", variant: Variant | str = "spidr_fast", batch: int = 16,
            seconds: float = 15.0) -> dict[str, float]:  # fmt: skip
    """Predicted ms per class (`CLASSES`) of one step of `variant` at batch x seconds on `device`; what
    `make gpu-check` puts beside the measured per-class times (kernels classified with `classify`)."""
    s = summarize(trace(variant, config, batch, seconds), device)
    return {c: s["classes"].get(c, {}).get("ms", 0.0) for c in CLASSES}


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def _table(summaries: dict[str, dict], key: str, names: tuple[str, ...]) -> str:
    cols = list(summaries)
    head = "| " + key + " | " + " | ".join(f"{c} GFLOP / GB / ms" for c in cols) + " |"
    lines = [head, "|---|" + "---:|" * len(cols)]
    for n in names:
        if not any(n in s[key] for s in summaries.values()):
            continue
        cells = []
        for s in summaries.values():
            r = s[key].get(n, {})
            cells.append(f"{r.get('gflop', 0):,.0f} / {r.get('gb', 0):.2f} / {r.get('ms', 0):.2f}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    tot = [f"**{s['gflop']:,.0f} / {s['gb']:.1f} / {s['ms']:.1f}**" for s in summaries.values()]
    lines.append("| **total** | " + " | ".join(tot) + " |")
    return "\n".join(lines)


def report(variants: list[str], config: Any = "base", batch: int = 16, seconds: float = 15.0,
           devices: tuple[str, ...] = tuple(DEVICES)) -> tuple[str, dict]:  # fmt: skip
    """Markdown tables and a JSON-ready dict for `variants` (phases A and B for training variants)."""
    traces, basis = {}, None
    for spec in variants:
        v = Variant.parse(spec)
        traces[str(v)] = trace(v, config, batch, seconds)
        if v.mode == "train":  # phase B (extractor frozen, EMA off) for the run average
            traces[str(dataclasses.replace(v, mode="frozen"))] = trace(dataclasses.replace(v, mode="frozen"),
                                                                       config, batch, seconds)  # fmt: skip
    basis_tr = trace(Variant(mode="train"), config, batch, seconds) if "spidr_fast" not in traces else None
    basis = (basis_tr or traces["spidr_fast"]).model_flops
    audio = next(iter(traces.values())).audio_s
    out: dict[str, Any] = {"config": str(config), "batch": batch, "seconds": seconds, "audio_s": audio,
                           "mfu_basis_gflop": basis / 1e9, "efficiency": EFFICIENCY, "devices": DEVICES,
                           "variants": {}}  # fmt: skip
    lines = [f"# Roofline: {batch} x {seconds:g} s ({audio:g} audio-s per GPU), config {config}", "",
             f"MFU basis: {basis / 1e9:,.0f} GFLOP per step (spidr_fast phase A, forward + backward, counted as the "
             "trainer counts). Phase A: extractor trained + teacher EMA; B: extractor frozen, no EMA.", "",
             "| variant | device | A ms | B ms | run avg ms | MFU A | MFU run avg | compute floor ms "
             "| memory floor ms |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    per_device: dict[str, dict[str, dict]] = {}
    for name, tr in traces.items():
        for device in devices:
            s = summarize(tr, device)
            per_device.setdefault(device, {})[name] = s
            out["variants"].setdefault(name, {})[device] = s
    for spec in variants:
        name = str(Variant.parse(spec))
        frozen = str(dataclasses.replace(Variant.parse(spec), mode="frozen"))
        for device in devices:
            a = per_device[device][name]
            if Variant.parse(spec).mode != "train":
                lines.append(f"| {name} | {device} | {a['ms']:.1f} | | | | | {a['floor_compute_ms']:.1f} | "
                             f"{a['floor_memory_ms']:.1f} |")  # fmt: skip
                continue
            b = per_device[device][frozen]
            avg = (a["ms"] + b["ms"]) / 2
            m_a, m_avg = mfu(basis, a["ms"], device), mfu(basis, avg, device)
            out["variants"][name][device].update(run_avg_ms=avg, mfu=m_a, mfu_run_avg=m_avg)
            lines.append(f"| {name} | {device} | {a['ms']:.1f} | {b['ms']:.1f} | {avg:.1f} | {m_a:.1%} | "
                         f"{m_avg:.1%} | {a['floor_compute_ms']:.1f} | {a['floor_memory_ms']:.1f} |")  # fmt: skip
    main_device = "H100" if "H100" in devices else devices[0]
    shown = {str(Variant.parse(s)): per_device[main_device][str(Variant.parse(s))] for s in variants}
    lines += ["", f"## By class, {main_device} ({', '.join(shown)})", "", _table(shown, "classes", CLASSES)]
    lines += ["", f"## By region, {main_device}", "", _table(shown, "regions", REGIONS)]
    lines += [
        "",
        f"## Bounds by class, {main_device} (instruction issue: ISSUE_INSTRUCTIONS)",
        "",
        bounds_table(shown),
    ]
    lines += [
        "",
        "## Efficiencies (EFFICIENCY in bench/roofline.py)",
        "",
        "| key | value | source |",
        "|---|---:|---|",
    ]
    lines += [f"| {k} | {v:g} | {src} |" for k, (v, src) in EFFICIENCY.items()]
    lines += ["", f"## Instructions per element (ISSUE_INSTRUCTIONS; {ISSUE_SOURCE})", "",
              "| kernel or op | thread-instructions / element |", "|---|---:|"]  # fmt: skip
    lines += [f"| {k} | {v:g} |" for k, v in ISSUE_INSTRUCTIONS.items()]
    return "\n".join(lines), out


def bounds_table(summaries: dict[str, dict]) -> str:
    """Per class of each summary: its predicted ms, the memory and issue bounds alone, and the ms of the ops whose
    instruction issue bounds them (more than their FLOPs and their bytes): the issue-bound classes."""
    lines = [
        "| variant | class | ms | memory bound ms | issue bound ms | issue-bound ops ms |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, s in summaries.items():
        for c, r in s["classes"].items():
            ms = [r["ms"], r.get("memory_ms", 0), r.get("issue_ms", 0), r.get("issue_bound_ms", 0)]
            lines.append(f"| {name} | {c} | " + " | ".join(f"{x:.2f}" for x in ms) + " |")
    bound = sorted({c for s in summaries.values() for c, r in s["classes"].items() if r.get("issue_bound_ms", 0) > 0})
    lines += [
        "",
        f"Issue-bound ops (instructions / issue rate above FLOPs and bytes) in: {', '.join(bound) or 'none'}.",
    ]
    return "\n".join(lines)


# The levers built so far, each switched off by a SPIDR_FAST_REFERENCE_OPS name (or COMPILE_GLUE: the
# `:layers` variant, the trainer's run.compile_glue=false); (title, name)
COMPILE_GLUE = "compile_glue"
LEVERS = (
    ("channels-last front-end (kernels/conv_frontend.py)", "frontend_layout"),
    ("bf16 residual stream (spidr_fast/models/layer_norm.py)", "residual_dtype"),
    ("first conv + LayerNorm + GELU fused (kernels/conv0.py)", "conv0"),
    ("fused positional conv layer (kernels/pos_conv.py)", "pos_conv"),
    ("dense attention backend per device (kernels/attention.py DENSE_ORDER)", "attention"),
    ("glue compiled by regions (GLUE_REGIONS, spidr_fast/train/parallelize.py)", COMPILE_GLUE),
)


def levers_table(config: Any = "base", batch: int = 16, seconds: float = 15.0, device: str = "H100") -> str:
    """spidr_fast with every built lever off, then each switched on in turn (cumulative), with and without the
    `ncw` what-if; run average of phases A and B, MFU on the spidr_fast basis."""
    basis = trace(Variant(), config, batch, seconds).model_flops
    lines = [f"| levers, cumulative ({device}) | ncw | A ms | B ms | run avg ms | gain ms | MFU run avg |",
             "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for ncw in (False, True):
        off = [name for _, name in LEVERS]
        first = None
        for title in ["all built levers off", *(f"+ {t}" for t, _ in LEVERS)]:
            if title.startswith("+"):
                off.pop(0)
            ref_ops = ",".join(name for name in off if name != COMPILE_GLUE)
            v = Variant(ref_ops=ref_ops, glue=COMPILE_GLUE not in off, ncw_transposes=ncw)
            a = summarize(trace(v, config, batch, seconds), device)["ms"]
            b = summarize(trace(dataclasses.replace(v, mode="frozen"), config, batch, seconds), device)["ms"]
            avg = (a + b) / 2
            first = avg if first is None else first
            lines.append(f"| {title} | {'yes' if ncw else 'no'} | {a:.1f} | {b:.1f} | {avg:.1f} | {first - avg:.1f} | "
                         f"{mfu(basis, avg, device):.1%} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="spidr_fast", help="variant to predict (without --compare)")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two variants side by side")
    ap.add_argument("--config", default="base", help="base, tiny, or a model config TOML/JSON")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=15.0, help="per utterance (16 x 15 s = 3.84M samples)")
    ap.add_argument("--device", choices=sorted(DEVICES), action="append", help="default: all")
    ap.add_argument("--json", help="also write the numbers here")
    ap.add_argument("--levers", action="store_true", help="also the built levers' cumulative gains (first device)")
    ap.add_argument("--eff", action="append", default=[], metavar="KEY=VALUE", help="what-if: an EFFICIENCY value")
    args = ap.parse_args(argv)
    for item in args.eff:
        key, _, value = item.partition("=")
        if key not in EFFICIENCY:
            raise SystemExit(f"--eff {item!r}: the key must be one of {sorted(EFFICIENCY)}")
        EFFICIENCY[key] = (float(value), f"what-if (--eff {item}); default {EFFICIENCY[key][0]:g}")
    variants = list(args.compare) if args.compare else [args.variant]
    devices = tuple(args.device or DEVICES)
    text, out = report(variants, args.config, args.batch, args.seconds, devices)
    print(text)
    if args.levers:
        device = "H100" if "H100" in devices else devices[0]
        print(f"\n## Levers built (SPIDR_FAST_REFERENCE_OPS or `:layers` switches each off), {device}\n")
        print(levers_table(args.config, args.batch, args.seconds, device))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
