"""Prediction heads + log-softmax + cross-entropy: the fused Triton op vs the references.

Providers (modes: `fwd` = loss and probability sums, `full` = forward + backward of loss.sum()):
  spidr_loop   the official recipe's formulation: C separate Linear + log_softmax + gather
  ref          `heads_cross_entropy_ref` (one batched baddbmm; materialises (C, N, V) log-probs)
  compile_ref  torch.compile(ref)
  triton       the fused custom op (one launch per direction for the C heads)
GPU shapes: C=8 heads, H=768, V=256 at a real base step's ~6k masked frames per GPU and at N=40k, bf16 inputs as
under autocast. extra_info: device, versions, peak memory and TFLOP/s at the median time
(2 N H V per head forward, 3x that with the backward's two GEMMs).
Run: `pytest bench/test_bench_heads_ce.py --benchmark-only` (GPU), `-k smoke` on CPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from common import measure, skip_unless_runnable
from test_bench_codebook import DEVICE  # bench/ is on sys.path under pytest

from spidr_fast.kernels.heads_ce import heads_cross_entropy_ref

GPU_SHAPES = {"step": {"C": 8, "N": 6_000, "H": 768, "V": 256}, "40k": {"C": 8, "N": 40_000, "H": 768, "V": 256}}
SMOKE_SHAPE = {"C": 2, "N": 200, "H": 48, "V": 32}


def spidr_loop(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor):
    """The official recipe: one Linear + log_softmax per head, probabilities summed for the perplexity."""
    losses, prob_sums = [], []
    for hc, w, b, lab in zip(h, weight, bias, labels):
        log_probs = torch.log_softmax(F.linear(hc, w, b).float(), dim=-1)
        losses.append(-log_probs.gather(-1, lab.unsqueeze(-1)).squeeze(-1))
        prob_sums.append(log_probs.detach().exp().sum(0))
    return torch.stack(losses), torch.stack(prob_sums)


def fused(h, weight, bias, labels):
    loss, _, prob_sums = torch.ops.spidr_fast.heads_ce(h, weight, bias, labels)
    return loss, prob_sums


PROVIDERS = {
    "spidr_loop": lambda: spidr_loop,
    "ref": lambda: heads_cross_entropy_ref,
    "compile_ref": lambda: torch.compile(heads_cross_entropy_ref, fullgraph=True, dynamic=False),
    "triton": lambda: fused,
}


def run_heads(benchmark, provider: str, mode: str, shape: dict, device: str, dtype: torch.dtype) -> None:
    skip_unless_runnable(provider, device)
    C, N, H, V = shape["C"], shape["N"], shape["H"], shape["V"]
    grad = mode == "full"
    h = torch.randn(C, N, H, device=device, dtype=dtype, requires_grad=grad)
    weight = (torch.randn(C, V, H, device=device) / H**0.5).to(dtype).requires_grad_(grad)
    bias = torch.zeros(C, V, device=device, dtype=dtype, requires_grad=grad)
    labels = torch.randint(0, V, (C, N), device=device)
    fn = PROVIDERS[provider]()

    def step():
        loss, prob_sums = fn(h, weight, bias, labels)
        if grad:
            torch.autograd.grad(loss.sum(), (h, weight, bias))
        return loss, prob_sums

    benchmark.group = f"heads CE {mode} C={C} N={N} H={H} V={V} {str(dtype)[6:]} {device}"
    measure(benchmark, step, device, flops=2 * C * N * H * V * (3 if grad else 1))


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["fwd", "full"])
@pytest.mark.parametrize("size", list(GPU_SHAPES))
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_heads_ce_gpu(benchmark, provider, mode, size):
    run_heads(benchmark, provider, mode, GPU_SHAPES[size], "cuda", torch.bfloat16)


@pytest.mark.parametrize("mode", ["fwd", "full"])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_heads_ce_smoke(benchmark, provider, mode):
    run_heads(benchmark, provider, mode, SMOKE_SHAPE, "cpu", torch.float32)
