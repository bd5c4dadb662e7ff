"""The dispatching public functions under torch.compile(fullgraph=True), and the custom ops' registrations."""

from __future__ import annotations

import pytest
import torch

from spidr_fast import kernels

C, N, K, D = 2, 37, 20, 24


def inputs(device: str):
    x = torch.randn(C, N, D, device=device)
    counts = torch.rand(C, K, device=device) + 0.5
    codebook = torch.randn(C, K, D, device=device) * counts.unsqueeze(-1)
    base = torch.randn(N, D, device=device, requires_grad=True)
    weight = torch.randn(C, K, D, device=device, requires_grad=True)
    bias = torch.zeros(C, K, device=device, requires_grad=True)
    return x, codebook, counts, base, weight, bias


def step(x, codebook, counts, base, weight, bias):
    """What a SpidR/DinoSR step asks of the kernels (DinoSR: every head reads one layer)."""
    labels = kernels.codebook_assign(x, codebook, counts)
    batch_counts, sums = kernels.codebook_accumulate(x, labels, K)
    fused = kernels.codebook_assign_accumulate(x, codebook, counts)
    loss, prob_sums = kernels.heads_cross_entropy(base.expand(C, N, D), weight, bias, labels)
    return loss.mean(), prob_sums, batch_counts, sums, *fused


def run(fn, args):
    out = fn(*args)
    grads = torch.autograd.grad(out[0], args[3:])
    return [*out, *grads]


@pytest.mark.parametrize(
    ("path", "compiler"),
    [("reference_backend", "inductor"), ("triton_backend", "inductor"), ("triton_backend", "aot_eager")],
)
def test_fullgraph_compile(request, path, compiler):
    device = request.getfixturevalue(path)
    torch._dynamo.reset()
    args = inputs(device)
    compiled = torch.compile(step, fullgraph=True, backend=compiler, dynamic=False)
    got, want = run(compiled, args), run(step, args)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_custom_op_registrations(triton_backend):
    """torch.library.opcheck: schema, fake tensors, autograd registration, AOT dispatch."""
    x, codebook, counts, base, weight, bias = inputs(triton_backend)
    labels = kernels.codebook_assign(x, codebook, counts)
    ops = torch.ops.spidr_fast
    torch.library.opcheck(ops.codebook_assign, (x, codebook, counts, "ieee"))
    torch.library.opcheck(ops.codebook_accumulate, (x, labels, K))
    torch.library.opcheck(ops.codebook_assign_accumulate, (x, codebook, counts, "ieee"))
    h = base.detach().expand(C, N, D).contiguous().requires_grad_()
    torch.library.opcheck(ops.heads_ce, (h, weight, bias, labels))
