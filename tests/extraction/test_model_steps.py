"""The extractor runs the model's own steps: its outputs are the model's `get_intermediate_outputs`, to the bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import spidr_fast
from spidr_fast.data.audio import standardize
from spidr_fast.extraction import FeatureExtractor
from spidr_fast.kernels import attention as attention_module
from spidr_fast.models import feature_extractor as conv_module
from tests.extraction.conftest import tiny_model


def test_the_conv_stack_is_not_named_like_the_extraction_api() -> None:
    """`spidr_fast.FeatureExtractor` is the extraction API; the model's conv stack is `ConvFeatureExtractor`,
    still stored as `feature_extractor` (the reference's state-dict name)."""
    model = tiny_model()
    assert not hasattr(conv_module, "FeatureExtractor")
    assert type(model.feature_extractor) is conv_module.ConvFeatureExtractor
    assert spidr_fast.FeatureExtractor.__module__ == "spidr_fast.extraction.extractor"
    assert "feature_extractor.conv_layers.0.conv.weight" in model.state_dict()


@pytest.mark.parametrize("mode", ["layer_norm", "group_norm"])
@pytest.mark.parametrize("before_residual", [True, False])
def test_extractor_equals_get_intermediate_outputs(mode: str, before_residual: bool) -> None:
    """One utterance (no padding) and a padded batch of two (`lengths=`): equal to the model's own
    inference API bit for bit, with the model's conv stack (the CPU channels-last front-end off)."""
    model = tiny_model(extractor_mode=mode)
    extractor = FeatureExtractor(
        model, layers=[1, 3], device="cpu", before_residual=before_residual, channels_last_frontend=False
    )
    rng = np.random.default_rng(0)
    raw = [(0.3 * rng.standard_normal(n)).astype(np.float32) for n in (5000, 3333)]
    waves = [torch.from_numpy(standardize(w)) for w in raw]
    with torch.inference_mode():
        alone = model.get_intermediate_outputs(waves[0][None], before_residual=before_residual)
        batch = torch.zeros(2, 5000)
        batch[0], batch[1, :3333] = waves
        lengths = torch.tensor([5000, 3333])
        padded = model.get_intermediate_outputs(batch, lengths=lengths, before_residual=before_residual)
    one = extractor(raw[0])
    two = extractor(raw)
    for layer in (1, 3):
        assert torch.equal(one[f"layer{layer}"], alone[layer - 1][0])
        frames = two[1][f"layer{layer}"].shape[0]
        assert torch.equal(two[0][f"layer{layer}"], padded[layer - 1][0])
        assert torch.equal(two[1][f"layer{layer}"], padded[layer - 1][1, :frames])


def test_compile_changes_no_global_dynamo_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """compile=True raises dynamo's recompile limit during its forwards only, never from the constructor."""
    limit = torch._dynamo.config.recompile_limit
    extractor = FeatureExtractor(tiny_model(), layers=[1], device="cpu", compile=True)
    assert torch._dynamo.config.recompile_limit == limit
    seen = []

    def forward(waveforms: torch.Tensor, sample_lengths: torch.Tensor | None) -> dict[str, torch.Tensor]:
        seen.append(torch._dynamo.config.recompile_limit)
        return extractor._forward_impl(waveforms, sample_lengths)  # this test checks the setting only

    monkeypatch.setattr(extractor, "_forward", forward)
    monkeypatch.setattr(extractor, "_layers", extractor._layers_impl)  # eager: this test checks the setting only
    extractor([np.ones(4000, dtype=np.float32), np.ones(1000, dtype=np.float32)])
    assert seen and all(s >= 64 for s in seen)
    assert torch._dynamo.config.recompile_limit == limit


@torch.library.custom_op("spidr_fast_test::extract_varlen", mutates_args=())
def _varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """An opaque varlen attention (as flash-attn's own custom ops are): SDPA per packed sequence."""
    out = torch.empty_like(q)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        seq = [x[start:end].transpose(0, 1) for x in (q, k, v)]
        out[start:end] = torch.nn.functional.scaled_dot_product_attention(*seq).transpose(0, 1)
    return out


@_varlen.register_fake
def _(q, k, v, cu):
    return torch.empty_like(q)


def test_compiled_extraction_builds_the_padding_outside_the_compiled_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    """compile=True compiles the layers only: the padded batch's packed-attention metadata (a host sync)
    is built eagerly once per batch and handed in, so the compiled layers trace the varlen backend with
    no graph break (before, the Padding was built inside the compiled region: masked SDPA). Outputs
    equal the eager extractor's."""
    monkeypatch.setenv("SPIDR_FAST_ATTENTION", "flash_attn")  # a packed backend, as on CUDA
    fake = lambda q, k, v, cu, _cu, n, _n, dropout_p: _varlen(q, k, v, cu)
    monkeypatch.setattr(attention_module, "_flash_attn_varlen", lambda: fake)
    torch._dynamo.reset()
    model = tiny_model()
    waves = [np.random.default_rng(0).standard_normal(n).astype(np.float32) for n in (4000, 2500)]
    extractor = FeatureExtractor(model, layers=[1, 2], device="cpu", dtype="bfloat16", compile=True)
    seen = []

    def layers(features: torch.Tensor, padding: object) -> dict[str, torch.Tensor]:
        seen.append(padding)
        explanation = torch._dynamo.explain(extractor._layers_impl)(features, padding)
        assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]
        return torch.compile(extractor._layers_impl, fullgraph=True, backend="eager")(features, padding)

    monkeypatch.setattr(extractor, "_layers", layers)
    compiled = extractor(waves)
    assert seen and seen[0].backends == ("flash_attn",) and seen[0].indices is not None
    monkeypatch.setenv("SPIDR_FAST_ATTENTION", "masked")
    eager = FeatureExtractor(model, layers=[1, 2], device="cpu", dtype="bfloat16")(waves)
    for a, b in zip(compiled, eager, strict=True):
        for name in ("layer1", "layer2"):
            torch.testing.assert_close(a[name], b[name], atol=3e-2, rtol=3e-2)
