"""Codebook assignment + EMA statistics: fused Triton kernels vs the references.

Providers:
  spidr_loop   the official recipe's formulation, one codebook at a time
               (cdist + argmin + one_hot + matmul per codebook)
  ref          `codebook_assign_accumulate_ref`: the same, batched over the C codebooks
  compile_ref  torch.compile(ref)
  triton       the fused custom op (IEEE fp32 dots, like the reference); `triton_tf32x3` on a GPU
               runs the same kernel with 3xTF32 tensor-core dots (~fp32 accuracy)
GPU shapes: C=8 codebooks, D=768, K=256 at a real base step's ~6k masked frames per GPU and at N=40k. Each record's
extra_info holds the device, versions, peak memory, and the achieved GB/s (x read once) and
TFLOP/s (2 N K D per codebook for the distances) at the median time.
Run: `pytest bench/test_bench_codebook.py --benchmark-only` (GPU), or with `-k smoke` on CPU
(tiny shapes; the Triton providers then need TRITON_INTERPRET=1 and measure the interpreter only).
This file also holds the helpers the heads benchmark imports (bench/ has no shared conftest of ours).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from common import measure, skip_unless_runnable  # bench/common.py: timing + device, versions, commit

from spidr_fast.kernels import codebook as cb

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# A real base step: ~6k masked frames per GPU (3.8M samples, ~11.4k frames); and the 40k of earlier runs.
GPU_SHAPES = {"step": {"C": 8, "N": 6_000, "K": 256, "D": 768}, "40k": {"C": 8, "N": 40_000, "K": 256, "D": 768}}
SMOKE_SHAPE = {"C": 2, "N": 200, "K": 32, "D": 48}


# ---- codebook providers ------------------------------------------------------------------------


def spidr_loop(x: torch.Tensor, codebook: torch.Tensor, counts: torch.Tensor):
    """The official recipe, per codebook: cdist + argmin, one_hot, one_hot^T x."""
    out = []
    for xc, code, cnt in zip(x, codebook, counts):
        labels = torch.cdist(xc.float(), code / cnt.unsqueeze(1), p=2).argmin(1)
        onehot = F.one_hot(labels, code.shape[0]).float()
        out.append((labels, onehot.sum(0), onehot.t() @ xc.float()))
    return out


def fused(precision: str):
    return lambda x, code, cnt: torch.ops.spidr_fast.codebook_assign_accumulate(x, code, cnt, precision)


PROVIDERS = {
    "spidr_loop": lambda: spidr_loop,
    "ref": lambda: cb.codebook_assign_accumulate_ref,
    "compile_ref": lambda: torch.compile(cb.codebook_assign_accumulate_ref, fullgraph=True, dynamic=False),
    "triton": lambda: fused("ieee"),
    "triton_tf32x3": lambda: fused("tf32x3"),
}


def codebook_inputs(C: int, N: int, K: int, D: int, device: str):
    x = torch.randn(C, N, D, device=device)
    counts = torch.rand(C, K, device=device) + 0.5
    return x, torch.randn(C, K, D, device=device) * counts.unsqueeze(-1), counts


def run_codebook(benchmark, provider: str, shape: dict, device: str) -> None:
    skip_unless_runnable(provider, device)
    C, N, K, D = shape["C"], shape["N"], shape["K"], shape["D"]
    x, codebook, counts = codebook_inputs(C, N, K, D, device)
    fn = PROVIDERS[provider]()
    benchmark.group = f"codebook assign+accumulate C={C} N={N} K={K} D={D} {device}"
    measure(
        benchmark,
        lambda: fn(x, codebook, counts),
        device,
        bytes_moved=x.numel() * x.element_size(),
        flops=2 * C * N * K * D,
    )


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")
@pytest.mark.parametrize("size", list(GPU_SHAPES))
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_codebook_gpu(benchmark, provider, size):
    run_codebook(benchmark, provider, GPU_SHAPES[size], "cuda")


@pytest.mark.parametrize("provider", ["spidr_loop", "ref", "compile_ref", "triton"])
def test_codebook_smoke(benchmark, provider):
    run_codebook(benchmark, provider, SMOKE_SHAPE, "cpu")
