"""The roofline's trace: one training step (or extraction forward) of a variant, run on `meta` tensors.

No GPU needed. The step runs for real on `meta` tensors at the real batch: every aten op is dispatched
with its true shapes, dtypes and strides, nothing is computed, and each op is recorded (`Op`) with
  * FLOPs: torch's formulas corrected and completed by the trainer's own `FLOP_FORMULAS`
    (spidr_fast/train/flops.py): a grouped conv's weight gradient counted once, not `groups` times;
    attention (flash / memory-efficient SDPA and its backward); the fused custom ops;
  * bytes: distinct input storages read + outputs written (a broadcast dim counted once);
  * its class (the kind of kernel it launches: `CLASSES`) and its region (the module that ran it, carried
    to the backward through the autograd node).

What the trace emulates of a CUDA run (the CPU build has no CUDA autocast):
  * bf16 autocast: the GEMM/conv/SDPA family in bf16, LayerNorm/GroupNorm/softmax/sum in fp32, leaf
    weights cast once per forward (autocast's cast cache);
  * SDPA: the flash backend when no mask is passed, memory-efficient with an additive bias otherwise;
    dropout as one fused `native_dropout`;
  * spidr_fast's ops take their Triton path (as on CUDA) unless `SPIDR_FAST_REFERENCE_OPS` lists them;
  * cuDNN's layout choice (a channels-last conv input gives a channels-last output) and the hidden
    `.contiguous()` copy of an eager LayerNorm given a non-contiguous input (serial helper-kernel time);
  * "compiled": the region each op fuses in (`Trace.compiled`; the time model fuses runs of ops within one).
    spidr_fast's regions are its trainer's, `COMPILED_REGIONS` of spidr_fast/train/parallelize.py (each
    transformer layer, and the glue regions between them); the reference 0.2.0 compiles the whole model
    (fwd + bwd; optimizer and EMA stay eager).

Variants (`Variant.parse`): `spidr_fast` | `reference`, then `:eager`, `:whole` (spidr_fast compiled as one graph,
glue included, as the reference), `:layers` (spidr_fast with its layers compiled, not its glue: the trainer's
run.compile_glue=false), `:ref_ops=a+b` (SPIDR_FAST_REFERENCE_OPS),
`:frozen` (phase B: extractor frozen, no EMA), `:extract` (extraction forward), `:ncw` (what-if: cuDNN wraps
every channels-first bf16 conv in NCW <-> NHWC transposes, which a GPU profile shows or not).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from common import environ
from roofline_classes import SCOPE, VIEW_OPS, op_class, region_of
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry, shape_wrapper

from spidr_fast.train.flops import FLOP_FORMULAS
from spidr_fast.train.parallelize import COMPILED_REGIONS, LAYER_REGIONS, region_paths

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
    torch.manual_seed(0)
    with environ(SPIDR_FAST_REFERENCE_OPS=variant.ref_ops):
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
