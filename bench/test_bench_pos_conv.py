"""One positional-conv layer (grouped conv + LayerNorm + GELU + padding mask): fused Triton op vs the reference.

Providers:
  ref          `pos_conv_layer_ref`: F.conv1d (cuDNN grouped conv) on a (B, D, T) view, then the fused
               `channel_layer_norm_gelu` (on CUDA): what the model ran before this op
  compile_ref  torch.compile(ref, fullgraph=True)
  triton       the fused custom op (forward: implicit-GEMM conv + LayerNorm + GELU in one launch; backward:
               LayerNorm-GELU backward, the conv kernel for grad_x, a chunked reduction for the weights)
Modes: fwd (y only) and full (y, then grad_x, grad_weight, grad_bias for a given dy).
GPU shape `base`: one layer of the base config (D=768, 16 groups, k=19) at a real step's batch per GPU
(16 utterances of 15 s: 749 frames each), bf16 (the training dtype). Each record's extra_info holds the
device, versions, peak memory (GPU), TFLOP/s (the conv's 2 B T D Cg k forward, 3x for full) and GB/s
counting only the unavoidable traffic: fwd reads x and writes y, full adds reading dy and x and writing dx.
Run: `pytest bench/test_bench_pos_conv.py --benchmark-only` (GPU), or with `-k smoke` on CPU (a tiny
shape; the triton provider then needs TRITON_INTERPRET=1 and measures the interpreter only).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from common import measure, skip_unless_runnable  # bench/common.py: timing + device, versions, commit

from spidr_fast.kernels import pos_conv as pc

GPU_SHAPES = {"base": {"B": 16, "T": 749, "D": 768, "groups": 16, "k": 19, "padded": False}}
SMOKE_SHAPE = {"B": 2, "T": 40, "D": 32, "groups": 4, "k": 5, "padded": True}
PROVIDERS: dict[str, Callable[[], Callable]] = {
    "ref": lambda: pc.pos_conv_layer_ref,
    "compile_ref": lambda: torch.compile(pc.pos_conv_layer_ref, fullgraph=True, dynamic=False),
    "triton": lambda: lambda x, keep, w, b, groups: torch.ops.spidr_fast.pos_conv(x, keep, w, b, 1e-5)[0],
}
TENSORS_MOVED = {"fwd": 2, "full": 5}  # x-sized tensors read or written at least once
FLOP_PASSES = {"fwd": 1, "full": 3}  # forward conv; + grad_x and grad_weight


def run_case(benchmark, provider: str, mode: str, shape: dict, dtype: torch.dtype, device: str) -> None:
    skip_unless_runnable(provider, device)
    B, T, D, groups, k = (shape[n] for n in ("B", "T", "D", "groups", "k"))
    full = mode == "full"
    x = torch.randn(B, T, D, device=device, dtype=dtype).requires_grad_(full)
    w = (torch.randn(D, D // groups, k, device=device) / (D // groups * k) ** 0.5).to(dtype).requires_grad_(full)
    b = torch.randn(D, device=device, dtype=dtype).requires_grad_(full)
    keep = torch.arange(T, device=device) < torch.linspace(T, T // 2, B, device=device)[:, None]
    keep = keep if shape["padded"] else None
    grad_y = torch.randn(B, T, D, device=device, dtype=dtype)
    fn = PROVIDERS[provider]()

    def call() -> object:
        if not full:
            with torch.no_grad():
                return fn(x, keep, w, b, groups)
        return torch.autograd.grad(fn(x, keep, w, b, groups), (x, w, b), grad_y)

    benchmark.group = f"pos-conv layer {mode} B={B} T={T} D={D} groups={groups} k={k} {str(dtype)[6:]} {device}"
    flops = FLOP_PASSES[mode] * 2 * B * T * D * (D // groups) * k
    measure(benchmark, call, device, bytes_moved=TENSORS_MOVED[mode] * x.numel() * x.element_size(), flops=flops)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=["bf16"])
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
@pytest.mark.parametrize("mode", ["fwd", "full"])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_pos_conv_gpu(benchmark, provider, mode, shape, dtype):
    run_case(benchmark, provider, mode, GPU_SHAPES[shape], dtype, "cuda")


@pytest.mark.parametrize("mode", ["fwd", "full"])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_pos_conv_smoke(benchmark, provider, mode):
    run_case(benchmark, provider, mode, SMOKE_SHAPE, torch.float32, "cpu")
