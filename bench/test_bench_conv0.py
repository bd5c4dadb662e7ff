"""The front-end's first block (Conv1d 1 -> 512, k 10, stride 5, + channel LayerNorm + GELU): fused op vs two ops.

Providers:
  ref      `conv0_layer_norm_gelu_ref`: F.conv1d, transpose -> F.layer_norm -> transpose -> F.gelu
  two_op   what the model ran before kernels/conv0.py: F.conv1d (cuDNN) + the fused channel LayerNorm + GELU
           (`channel_layer_norm_gelu`, channels-last output): u written, read, and in the backward du written and
           read again by cuDNN's weight gradient
  triton   the fused op (`spidr_fast::conv0_layer_norm_gelu`): the waveform in, y out; the backward reads the
           waveform and dy and writes only the parameter gradients
Modes: fwd (y only, no autograd: the extractor frozen) and full (y, then the four parameter gradients for a given
dy; the waveform needs none). dtypes: bf16 runs under autocast with fp32 waveform and parameters (the training
step), fp32 without. GPU shape: a base step of 16 x 15 s (B=16, S=240,000 samples, C=512, T=47,999 frames).
Each record's extra_info holds the device, versions, peak memory (GPU), and the achieved GB/s at the median time,
counting only the unavoidable traffic: fwd writes y, full also reads dy (one y-sized tensor each way); the
waveform, statistics and parameters not counted.
Run: `pytest bench/test_bench_conv0.py --benchmark-only` (GPU), or with `-k smoke` on CPU (a tiny shape; the
triton provider then needs TRITON_INTERPRET=1 and measures the interpreter only).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from common import measure, skip_unless_runnable  # bench/common.py: timing + device, versions, commit

from spidr_fast.kernels import conv0 as c0
from spidr_fast.kernels.conv_frontend import channel_layer_norm_gelu

GPU_SHAPE = {"B": 16, "S": 240_000, "C": 512, "K": 10, "stride": 5}
SMOKE_SHAPE = {"B": 2, "S": 403, "C": 24, "K": 10, "stride": 5}


def _two_op(x, cw, lw, lb, stride):
    return channel_layer_norm_gelu(F.conv1d(x.unsqueeze(1), cw, None, stride), lw, lb, channels_last=True)


def _fused(x, cw, lw, lb, stride):
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    return c0._conv0_op(x, cw, None, lw, lb, stride, 1e-5, dtype, True)[0]


PROVIDERS: dict[str, Callable] = {
    "ref": lambda x, cw, lw, lb, stride: c0.conv0_layer_norm_gelu_ref(x, cw, None, lw, lb, stride),
    "two_op": _two_op,
    "triton": _fused,
}


def run_case(benchmark, provider: str, mode: str, shape: dict, dtype: torch.dtype, device: str) -> None:
    skip_unless_runnable(provider, device)
    B, S, C, K, stride = (shape[k] for k in ("B", "S", "C", "K", "stride"))
    T = c0.num_frames(S, K, stride)
    x = torch.randn(B, S, device=device)  # the waveform: no gradient
    full = mode == "full"
    params = [
        (torch.randn(C, 1, K, device=device) * K**-0.5).requires_grad_(full),
        (torch.randn(C, device=device) * 0.5 + 1).requires_grad_(full),
        (torch.randn(C, device=device) * 0.5).requires_grad_(full),
    ]
    grad_y = torch.randn(B, T, C, device=device, dtype=dtype).transpose(1, 2)  # channels-last, as the next conv's
    fn = PROVIDERS[provider]
    autocast = torch.autocast(device, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    def call() -> object:
        with autocast:
            if not full:
                with torch.no_grad():
                    return fn(x, *params, stride)
            y = fn(x, *params, stride)
        return torch.autograd.grad(y, params, grad_y.to(y.dtype))

    benchmark.group = f"first conv block {mode} B={B} S={S} C={C} {str(dtype)[6:]} {device}"
    y_bytes = B * C * T * torch.finfo(dtype).bits // 8
    measure(benchmark, call, device, bytes_moved=(2 if full else 1) * y_bytes)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("mode", ["fwd", "full"])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_conv0_gpu(benchmark, provider, mode, dtype):
    run_case(benchmark, provider, mode, GPU_SHAPE, dtype, "cuda")


@pytest.mark.parametrize("mode", ["fwd", "full"])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_conv0_smoke(benchmark, provider, mode):
    run_case(benchmark, provider, mode, SMOKE_SHAPE, torch.float32, "cpu")
