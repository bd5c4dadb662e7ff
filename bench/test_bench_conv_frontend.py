"""Channel LayerNorm + GELU of a (B, C, T) conv output: fused Triton kernel vs the reference.

Providers:
  ref          `channel_layer_norm_gelu_ref`: transpose -> F.layer_norm -> transpose -> F.gelu
               (what the model's ChannelLayerNorm + F.gelu run)
  compile_ref  torch.compile(ref, fullgraph=True)
  triton       the fused custom op (one read of x and one write of y; the backward reads x and dy
               and writes dx, with per-program partial sums for grad_weight/grad_bias)
Modes: fwd (y only) and full (y, then grad_x, grad_weight, grad_bias for a given dy).
GPU shapes (a real base step, 3.8M samples per GPU as 12 utterances of 316k samples): `block0` is the
extractor's first block (B=12, T=63200, C=512, affine); `posconv` is one positional-conv layer (B=12,
T=987 frames, C=768, no affine).
Each record's extra_info holds the device, versions, peak memory (GPU), and the achieved GB/s at the
median time, counting only the unavoidable traffic: fwd reads x and writes y (2 tensors of x's
size), full adds reading x and dy and writing dx (5 in all); statistics and parameters not counted.
Run: `pytest bench/test_bench_conv_frontend.py --benchmark-only` (GPU), or with `-k smoke` on CPU
(a tiny shape; the triton provider then needs TRITON_INTERPRET=1 and measures the interpreter only).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from common import measure, skip_unless_runnable  # bench/common.py: timing + device, versions, commit

from spidr_fast.kernels import conv_frontend as cf

GPU_SHAPES = {  # a real base step: 3.8M samples per GPU, e.g. 12 utterances of 316k samples (~11.9k frames)
    "block0": {"B": 12, "C": 512, "T": 63_200, "affine": True},
    "posconv": {"B": 12, "C": 768, "T": 987, "affine": False},
}
SMOKE_SHAPE = {"B": 2, "C": 59, "T": 64, "affine": True}
PROVIDERS: dict[str, Callable[[], Callable]] = {
    "ref": lambda: cf.channel_layer_norm_gelu_ref,
    "compile_ref": lambda: torch.compile(cf.channel_layer_norm_gelu_ref, fullgraph=True, dynamic=False),
    "triton": lambda: lambda x, w, b: torch.ops.spidr_fast.channel_layer_norm_gelu(x, w, b, 1e-5, False)[0],
}
TENSORS_MOVED = {"fwd": 2, "full": 5}  # x-sized tensors read or written at least once


def run_case(benchmark, provider: str, mode: str, shape: dict, dtype: torch.dtype, device: str) -> None:
    skip_unless_runnable(provider, device)
    B, C, T, affine = shape["B"], shape["C"], shape["T"], shape["affine"]
    x = (torch.randn(B, C, T, device=device) * 2 + 0.5).to(dtype).requires_grad_(mode == "full")
    w = torch.randn(C, device=device).requires_grad_(mode == "full") if affine else None  # fp32, as in the model
    b = torch.randn(C, device=device).requires_grad_(mode == "full") if affine else None
    grad_y = torch.randn(B, C, T, device=device, dtype=dtype)
    fn = PROVIDERS[provider]()
    leaves = [t for t in (x, w, b) if t is not None]

    def call() -> object:
        if mode == "fwd":
            with torch.no_grad():
                out = fn(x, w, b)
        else:
            out = torch.autograd.grad(fn(x, w, b), leaves, grad_y)
        if device == "cuda":
            torch.cuda.synchronize()  # inside the timed callable: the time includes the kernels
        return out

    benchmark.group = f"channel LN+GELU {mode} B={B} C={C} T={T} affine={affine} {str(dtype)[6:]} {device}"
    measure(benchmark, call, device, bytes_moved=TENSORS_MOVED[mode] * x.numel() * x.element_size())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
@pytest.mark.parametrize("mode", ["fwd", "full"])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_conv_frontend_gpu(benchmark, provider, mode, shape, dtype):
    run_case(benchmark, provider, mode, GPU_SHAPES[shape], dtype, "cuda")


@pytest.mark.parametrize("mode", ["fwd", "full"])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_conv_frontend_smoke(benchmark, provider, mode):
    run_case(benchmark, provider, mode, SMOKE_SHAPE, torch.float32, "cpu")
