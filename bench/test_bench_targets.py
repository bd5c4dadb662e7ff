"""Teacher targets (instance norm over time, then the masked frames): the one-pass fast path vs the reference.

Providers (`spidr_fast.kernels.targets`):
  ref          `instance_norm_targets_ref`: normalise every frame of every layer, then gather
  compile_ref  torch.compile(ref)
  fast         `instance_norm_targets_fast`: statistics in one reduction, normalise only the gathered frames
GPU shape: a real base step per GPU, C=8 fp32 teacher layers of (B=8, T=1425, D=768) (~11.4k frames)
with 750 masked frames per row (~6k), padded rows (a key mask). extra_info holds the device, versions,
peak memory and the achieved GB/s (the C layers read once) at the median time.
Run: `pytest bench/test_bench_targets.py --benchmark-only` (GPU), or with `-k smoke` on CPU (tiny shapes).
Accuracy: tests/kernels/test_targets.py.
"""

from __future__ import annotations

import pytest
import torch
from common import measure  # bench/common.py: timing + device, versions, commit

from spidr_fast.kernels import targets

GPU_SHAPE = {"C": 8, "B": 8, "T": 1425, "D": 768, "M": 750}
SMOKE_SHAPE = {"C": 2, "B": 3, "T": 50, "D": 16, "M": 20}
PROVIDERS = {
    "ref": lambda: targets.instance_norm_targets_ref,
    "compile_ref": lambda: torch.compile(targets.instance_norm_targets_ref, fullgraph=True, dynamic=False),
    "fast": lambda: targets.instance_norm_targets_fast,
}


def run_case(benchmark, provider: str, shape: dict, device: str) -> None:
    C, B, T, D, M = shape["C"], shape["B"], shape["T"], shape["D"], shape["M"]
    g = torch.Generator().manual_seed(0)
    layers = [torch.randn(B, T, D, generator=g).to(device) for _ in range(C)]
    lengths = [T - i * ((T - M) // B) for i in range(B)]  # padded rows, each longer than M
    key_mask = torch.arange(T, device=device) < torch.tensor(lengths, device=device)[:, None]
    mask_indices = torch.stack([torch.randperm(n, generator=g)[:M].sort().values for n in lengths]).to(device)
    fn = PROVIDERS[provider]()
    benchmark.group = f"targets C={C} B={B} T={T} D={D} M={M} {device}"
    measure(
        benchmark,
        lambda: fn(layers, key_mask, mask_indices),
        device,
        bytes_moved=C * B * T * D * 4,
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_targets_gpu(benchmark, provider):
    run_case(benchmark, provider, GPU_SHAPE, "cuda")


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_targets_smoke(benchmark, provider):
    run_case(benchmark, provider, SMOKE_SHAPE, "cpu")
