"""spidr_fast.units.KMeans on the fused codebook kernels (the CUDA path; the interpreter on CPU)
against the same fit on the references."""

from __future__ import annotations

import numpy as np
import torch

from spidr_fast.units import KMeans


def test_kmeans_on_kernels_equals_kmeans_on_references(triton_backend, monkeypatch):
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((300, 8)).astype(np.float32) + rng.integers(0, 4, (300, 1)) * 3)
    kw = {"iters": 3, "seed": 1, "device": triton_backend, "chunk_frames": 128}
    fused = KMeans(5, **kw).fit(x)
    monkeypatch.setenv("SPIDR_FAST_BACKEND", "reference")
    ref = KMeans(5, **kw).fit(x)
    torch.testing.assert_close(fused.cluster_centers_, ref.cluster_centers_, rtol=1e-5, atol=1e-5)
    assert abs(fused.inertia_ / ref.inertia_ - 1) < 1e-5
    monkeypatch.setenv("SPIDR_FAST_BACKEND", "triton")
    assert torch.equal(fused.predict(x), torch.from_numpy(ref.predict(x.numpy())).to(x.device))
