"""Teacher targets: the fast instance-norm + gather path against the reference (normalise all, then gather)."""

from __future__ import annotations

import pytest
import torch

from spidr_fast.kernels.targets import instance_norm_targets_fast, instance_norm_targets_ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("lengths", "masked"), [([50, 50], 20), ([50, 31, 7], 5), ([9], 0), ([2, 2], 1)])
def test_fast_matches_reference(dtype: torch.dtype, lengths: list[int], masked: int) -> None:
    C, T, D = 3, max(lengths), 24
    layers = [(torch.randn(len(lengths), T, D) * 3 + 1).to(dtype) for _ in range(C)]
    padded = len(set(lengths)) > 1
    key_mask = torch.arange(T) < torch.tensor(lengths)[:, None] if padded else None
    g = torch.Generator().manual_seed(0)
    mask_indices = torch.stack(
        [torch.randperm(min(lengths), generator=g)[:masked].sort().values for _ in lengths]
    )  # masked frames are real frames
    ref = instance_norm_targets_ref(layers, key_mask, mask_indices)
    fast = instance_norm_targets_fast(layers, key_mask, mask_indices)
    assert fast.shape == ref.shape == (C, len(lengths) * masked, D) and fast.dtype == torch.float32
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def test_reference_is_instance_norm_without_padding() -> None:
    x = torch.randn(2, 17, 8)
    idx = torch.arange(17).expand(2, -1)
    expected = torch.nn.functional.instance_norm(x.transpose(1, 2)).transpose(1, 2).flatten(0, 1)
    assert torch.equal(instance_norm_targets_ref([x], None, idx)[0], expected)
