"""The transformer's LayerNorm: nn.LayerNorm outside autocast; under autocast, its fp32 result rounded to the
autocast dtype (a bf16 residual stream), or autocast's fp32 with SPIDR_FAST_REFERENCE_OPS=residual_dtype."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spidr_fast.models.layer_norm import LayerNorm
from spidr_fast.models.transformer import FeedForward, SelfAttention, TransformerLayer


def _pair() -> tuple[LayerNorm, nn.LayerNorm]:
    torch.manual_seed(0)
    ours, ref = LayerNorm(24), nn.LayerNorm(24)
    nn.init.normal_(ours.weight, 1.0, 0.3)
    nn.init.normal_(ours.bias, 0.0, 0.3)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def test_fp32_is_nn_layer_norm_bitwise() -> None:
    ours, ref = _pair()
    x = torch.randn(3, 5, 24) * 3 + 1
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert torch.equal(ours(x), ref(x))


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
def test_autocast_output_in_compute_dtype(monkeypatch: pytest.MonkeyPatch, in_dtype: torch.dtype) -> None:
    ours, ref = _pair()
    x = (torch.randn(3, 5, 24) * 3 + 1).to(in_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = ref(x.float())  # CUDA autocast's layer_norm: fp32 math, fp32 output, whatever the input dtype
        got = ours(x)
        monkeypatch.setenv("SPIDR_FAST_REFERENCE_OPS", "residual_dtype")
        kept = ours(x)
    assert want.dtype == torch.float32 and got.dtype == torch.bfloat16
    assert torch.equal(got, want.to(torch.bfloat16))  # the same math, rounded once
    assert torch.equal(kept, want)


def test_layer_residual_stream_is_bf16_and_compiles_fullgraph() -> None:
    torch.manual_seed(0)
    layer = TransformerLayer(32, SelfAttention(32, 4, qkv_bias=True, dropout=0.0), FeedForward(32, 64, 0.0), 0.0,
                             pre_ln=False).eval()  # fmt: skip
    x = torch.randn(2, 7, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ffn = layer(x)
        compiled = torch.compile(layer, fullgraph=True, backend="eager")(x)
    assert out.dtype == torch.bfloat16 and ffn.dtype == torch.bfloat16
    torch.testing.assert_close(compiled[0], out, atol=0, rtol=0)
    assert layer(x)[0].dtype == torch.float32  # no autocast: fp32 throughout
