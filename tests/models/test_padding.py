"""A padded batch gives, on real frames, the outputs of each utterance alone (both extractor modes)."""

from __future__ import annotations

import pytest
import torch

from spidr_fast.config import SpidRConfig
from spidr_fast.models import SpidR
from spidr_fast.models.padding import attention_mask_from_lengths
from spidr_fast.train.config import preset_model_fields

TINY = preset_model_fields("tiny")
LENGTHS = [9_000, 6_417, 400, 7_999]  # 400 samples: exactly one frame


def padded_batch(lengths: list[int]) -> torch.Tensor:
    waveforms = torch.zeros(len(lengths), max(lengths))
    for i, n in enumerate(lengths):
        waveforms[i, :n] = torch.randn(n)
    return waveforms


@pytest.mark.parametrize("mode", ["layer_norm", "group_norm"])
@pytest.mark.parametrize("before_residual", [True, False])
def test_padded_batch_equals_single_utterances(mode: str, before_residual: bool) -> None:
    model = SpidR(SpidRConfig(**TINY, extractor_mode=mode)).eval()
    waveforms = padded_batch(LENGTHS)
    with torch.no_grad():
        batched = model.get_intermediate_outputs(
            waveforms, lengths=torch.tensor(LENGTHS), before_residual=before_residual
        )
        for i, n in enumerate(LENGTHS):
            single = model.get_intermediate_outputs(waveforms[i : i + 1, :n], before_residual=before_residual)
            for layer, (b, s) in enumerate(zip(batched, single, strict=True)):
                frames = s.shape[1]
                err = (b[i, :frames] - s[0]).abs().max().item()
                assert err <= 1e-5, f"utterance {i} layer {layer}: {err}"


def test_attention_mask_form_equals_lengths_form_for_layer_norm() -> None:
    model = SpidR(SpidRConfig(**TINY)).eval()
    waveforms = padded_batch(LENGTHS)
    lengths = torch.tensor(LENGTHS)
    frames = model.feature_extractor.output_lengths(lengths)
    mask = attention_mask_from_lengths(frames, int(frames.max()))
    with torch.no_grad():
        by_mask = model.get_intermediate_outputs(waveforms, attention_mask=mask)
        by_lengths = model.get_intermediate_outputs(waveforms, lengths=lengths)
    for a, b in zip(by_mask, by_lengths, strict=True):
        assert torch.equal(a[mask[:, 0, 0]], b[mask[:, 0, 0]])


def test_group_norm_statistics_exclude_padding() -> None:
    """Unlike the reference (statistics over padded samples too), padding does not change real frames."""
    model = SpidR(SpidRConfig(**TINY, extractor_mode="group_norm")).eval()
    short = torch.randn(1, 4_000)
    padded = torch.cat([short, torch.zeros(1, 6_000)], dim=1)
    with torch.no_grad():
        alone = model.feature_extractor(short)
        ours = model.feature_extractor(padded, torch.tensor([4_000]))[:, : alone.shape[1]]
        leaky = model.feature_extractor(padded)[:, : alone.shape[1]]  # what the reference computes
    assert (ours - alone).abs().max() <= 1e-5
    assert (leaky - alone).abs().max() > 1e-3


def test_padded_codebooks_and_training_forward_run() -> None:
    model = SpidR(SpidRConfig(**TINY))
    waveforms = padded_batch(LENGTHS[:2])
    lengths = torch.tensor(LENGTHS[:2])
    probs = model.eval().get_codebooks(waveforms, lengths=lengths)[-1]
    assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)
    model.train()
    frames = int(model.feature_extractor.output_lengths(lengths).min())
    mask_indices = torch.arange(0, frames, 3).expand(2, -1)
    losses, ppl = model(waveforms, mask_indices=mask_indices, lengths=lengths)
    assert losses.shape == (2 * mask_indices.shape[1],)
    assert torch.isfinite(losses).all() and ppl["target_ppl"] >= 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lengths": torch.tensor([100, 200])}, "lengths must have shape"),
        ({"lengths": torch.tensor([100, 10_000, 5])}, r"lengths must be in \[1, 9000\]"),
        ({"lengths": torch.tensor([0, 5, 5])}, r"lengths must be in"),
        ({"attention_mask": torch.ones(3, 1, 5, 5, dtype=torch.bool)}, "attention_mask must have shape"),
        ({"attention_mask": torch.ones(3, 1, 27, 27)}, "attention_mask must be bool"),
    ],
)
def test_bad_padding_arguments(kwargs: dict, match: str) -> None:
    model = SpidR(SpidRConfig(**TINY)).eval()
    with pytest.raises(ValueError, match=match):
        model.get_intermediate_outputs(torch.randn(3, 9_000), **kwargs)


def test_mask_and_lengths_together_rejected() -> None:
    model = SpidR(SpidRConfig(**TINY)).eval()
    with pytest.raises(ValueError, match="either attention_mask or lengths"):
        model.get_intermediate_outputs(
            torch.randn(1, 900), lengths=torch.tensor([900]), attention_mask=torch.ones(1, 1, 2, 2, dtype=torch.bool)
        )
