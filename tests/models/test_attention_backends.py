"""Attention backends agree with the masked-SDPA reference on real frames, forward and backward."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from spidr_fast.kernels.attention import Padding, attention, attention_ref

# The module itself (`spidr_fast.kernels.attention` as an attribute is the dispatching function).
attn = importlib.import_module("spidr_fast.kernels.attention")


def fake_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0):
    """flash-attn's varlen signature, computed per sequence with SDPA: checks the glue, not flash-attn."""
    assert cu_seqlens_q.dtype == torch.int32 and q.dim() == 3  # (total, H, Dh), as flash-attn wants
    assert int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) == max_seqlen_q
    out = torch.empty_like(q)
    for start, end in zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist(), strict=True):
        seq = [x[start:end].transpose(0, 1) for x in (q, k, v)]  # (H, T_b, Dh)
        out[start:end] = F.scaled_dot_product_attention(*seq, dropout_p=dropout_p).transpose(0, 1)
    return out


@pytest.fixture(params=["masked", "nested", "flash_attn"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("SPIDR_FAST_ATTENTION", request.param)
    if request.param == "flash_attn":
        monkeypatch.setattr(attn, "_flash_attn_varlen", lambda: fake_flash_attn_varlen_func)
    return request.param


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("lengths", [[7, 4, 1], [5, 5], [33, 17, 32, 1]])
def test_backends_match_reference(backend: str, lengths: list[int], dtype: torch.dtype, tol: float) -> None:
    batch, heads, seq, dim = len(lengths), 2, max(lengths), 16
    q, k, v = (torch.randn(batch, heads, seq, dim, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = torch.arange(seq) < torch.tensor(lengths)[:, None]
    padding = Padding.from_mask(mask)
    real = mask[:, None, :, None].expand(batch, heads, seq, dim)

    out = attention(q, k, v, padding)
    grads = torch.autograd.grad((out * real).float().square().sum(), (q, k, v))
    ref = attention_ref(q, k, v, padding)
    ref_grads = torch.autograd.grad((ref * real).float().square().sum(), (q, k, v))
    assert (out - ref)[real].abs().max() <= tol
    for g, rg in zip(grads, ref_grads, strict=True):
        assert (g - rg).abs().max() <= tol * max(1.0, rg.abs().max().item())
    if backend != "masked":
        assert (out[~real] == 0).all()  # packed backends leave padded query rows at zero


def test_no_padding_is_plain_sdpa() -> None:
    q, k, v = (torch.randn(2, 2, 9, 8) for _ in range(3))
    assert torch.equal(attention(q, k, v, None), F.scaled_dot_product_attention(q, k, v))


def test_padding_bookkeeping() -> None:
    mask = torch.tensor([[True, True, True], [True, False, False], [False, False, False]])
    padding = Padding.from_mask(mask)
    assert padding.cu_seqlens.tolist() == [0, 3, 4, 4] and padding.max_seqlen == 3
    assert padding.indices.tolist() == [0, 1, 2, 3]
    x = torch.randn(3, 2, 3, 4)  # (B, H, T, Dh)
    packed = padding.pack(x)
    assert packed.shape == (4, 2, 4)
    back = padding.unpack(packed, 3, 3)
    assert torch.equal(back[mask[:, None, :, None].expand_as(x)], x[mask[:, None, :, None].expand_as(x)])


@pytest.mark.parametrize("name", ["nested", "flash_attn"])
def test_dropout_is_applied_and_unbiased(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With dropout the output changes, and its mean over many draws approaches the dropout-free one."""
    monkeypatch.setenv("SPIDR_FAST_ATTENTION", name)
    monkeypatch.setattr(attn, "_flash_attn_varlen", lambda: fake_flash_attn_varlen_func)
    q, k, v = (torch.randn(2, 1, 6, 8) for _ in range(3))
    padding = Padding.from_mask(torch.arange(6) < torch.tensor([[6], [3]]))
    exact = attention(q, k, v, padding)
    draws = torch.stack([attention(q, k, v, padding, dropout_p=0.3) for _ in range(400)])
    assert not torch.equal(draws[0], exact)
    assert (draws.mean(0) - exact).abs().max() < 0.15 * exact.abs().max()


def test_model_outputs_equal_across_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    from spidr_fast import SpidR, SpidRConfig
    from tests.models.test_padding import LENGTHS, TINY, padded_batch

    model = SpidR(SpidRConfig(**TINY)).eval()
    waveforms, lengths = padded_batch(LENGTHS), torch.tensor(LENGTHS)
    frames = model.feature_extractor.output_lengths(lengths)
    outputs = {}
    for name in ("masked", "nested"):
        monkeypatch.setenv("SPIDR_FAST_ATTENTION", name)
        with torch.no_grad():
            outputs[name] = model.get_intermediate_outputs(waveforms, lengths=lengths)
    for a, b in zip(outputs["masked"], outputs["nested"], strict=True):
        for i, n in enumerate(frames.tolist()):
            assert (a[i, :n] - b[i, :n]).abs().max() <= 1e-5
