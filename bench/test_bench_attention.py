"""Padded self-attention: the packed varlen backends vs the reference (masked SDPA).

Providers (`spidr_fast.kernels.attention`'s backends, each forced with SPIDR_FAST_ATTENTION):
  ref           "masked", `self_attention_ref`: SDPA with a (B, 1, 1, T) key mask (the reference; the CPU path)
  nested        SDPA on nested jagged tensors of the real frames (CUDA without flash-attn)
  flash_attn    flash-attn 2's varlen kernel on the packed real frames (fp16/bf16)
  flash_attn_4  FlashAttention-4 (`flash_attn.cute`, Hopper+), forward only (the teacher, extraction)
Modes: "fwd" (no gradient: the teacher's and extraction's calls) and "full" (forward + backward of
q, k, v: the student's). A backend that cannot run these inputs here (not installed, no CUDA, fp32
for the flash ones, FA4 with a gradient) is skipped, never timed as its fallback.
GPU shape: a base-size padded batch (12 heads of 64, 8 utterances of 64..1000 frames) in bf16.
Each record's extra_info holds the device, versions, peak memory and the achieved TFLOP/s
(4 T_b^2 H Dh per utterance forward, x3.5 with the backward) at the median time.
Run: `pytest bench/test_bench_attention.py --benchmark-only` (GPU), or with `-k smoke` on CPU
(tiny shapes, fp32: ref and nested only). Accuracy of every backend: tests/kernels/test_attention.py.
`make gpu-check` does not run this file: it times attention once, in bench/attention_backends.py
(every padded and dense backend, each with its errors against fp32 SDPA).
"""

from __future__ import annotations

import pytest
import torch
from common import measure  # bench/common.py: timing + device, versions, commit

from spidr_fast.kernels import attention as attn

GPU_SHAPE = {"lengths": [1000, 737, 512, 301, 64, 999, 800, 250], "heads": 12, "head_dim": 64}
SMOKE_SHAPE = {"lengths": [13, 7, 10], "heads": 2, "head_dim": 8}
PROVIDERS = {"ref": "masked", "nested": "nested", "flash_attn": "flash_attn", "flash_attn_4": "flash_attn_4"}


def run_case(benchmark, monkeypatch, provider: str, mode: str, shape: dict, dtype: torch.dtype, device: str) -> None:
    lengths, heads, head_dim = shape["lengths"], shape["heads"], shape["head_dim"]
    backend = PROVIDERS[provider]
    if backend == "flash_attn_4" and mode == "full":
        pytest.skip("spidr_fast calls FlashAttention-4's forward only")
    monkeypatch.setenv("SPIDR_FAST_ATTENTION", backend)
    seq = max(lengths)
    mask = torch.arange(seq, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
    padding = attn.Padding.from_mask(mask)  # once per batch, outside the timed call (as the model does)
    q, k, v = (
        torch.randn(len(lengths), heads, seq, head_dim, device=device, dtype=dtype, requires_grad=mode == "full")
        for _ in range(3)
    )
    with torch.set_grad_enabled(mode == "full"):
        ran = attn.select_backend(padding, q, 0.0)
    if ran != backend:
        pytest.skip(f"{backend} cannot run here ({device}, {str(dtype)[6:]}, {mode}): it would fall back to {ran}")
    if backend == "flash_attn" and attn._flash_attn_varlen() is None:
        pytest.skip("flash-attn is not installed")
    if backend == "flash_attn_4" and attn._flash_attn_4_varlen() is None:
        pytest.skip("flash-attn-4 (flash_attn.cute) is not installed")
    grad_out = torch.randn_like(q)

    def call() -> object:
        if mode == "fwd":
            with torch.no_grad():
                return attn.self_attention(q, k, v, padding)
        return torch.autograd.grad(attn.self_attention(q, k, v, padding), (q, k, v), grad_out)

    flops = 4 * heads * head_dim * sum(n * n for n in lengths) * (1 if mode == "fwd" else 3.5)
    benchmark.group = f"attention {mode} lengths={lengths} H={heads} Dh={head_dim} {str(dtype)[6:]} {device}"
    measure(benchmark, call, device, flops=flops)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["fwd", "full"])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_attention_gpu(benchmark, monkeypatch, provider, mode):
    run_case(benchmark, monkeypatch, provider, mode, GPU_SHAPE, torch.bfloat16, "cuda")


@pytest.mark.parametrize("mode", ["fwd", "full"])
@pytest.mark.parametrize("provider", ["ref", "nested"])
def test_attention_smoke(benchmark, monkeypatch, provider, mode):
    run_case(benchmark, monkeypatch, provider, mode, SMOKE_SHAPE, torch.float32, "cpu")
