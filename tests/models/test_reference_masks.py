"""The reference's own attention masks give the reference's outputs (both extractor modes).

The reference's collator (`spidr.data.dataset.SpeechCollatorWithMasking`) passes a broadcast
(B, 1, 1, T) mask for a padded batch, and its users pass all-True (B, 1, T, T) masks for cropped
batches. A row whose frames cover the whole padded waveform is unpadded: group-norm statistics over
all its samples, as the reference computes them.
"""

from __future__ import annotations

import pytest
import torch

import spidr_fast
from tests.models.test_reference_parity import NO_DROPOUT, TINY, close, reference_model

pytest.importorskip("spidr", reason="the reference package: `make test` installs spidr==0.2.0")

MODES = ["layer_norm", "group_norm"]


def pair(mode: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    ref, _ = reference_model("spidr", {**TINY, **NO_DROPOUT, "extractor_mode": mode})
    ours = spidr_fast.SpidR(spidr_fast.SpidRConfig(**TINY, **NO_DROPOUT, extractor_mode=mode))
    ours.load_state_dict(ref.state_dict())
    return ours.eval(), ref.eval()


def collate(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A padded batch and its mask as the reference's `SpeechCollatorWithMasking` builds them (its
    module needs torchcodec, so it is not imported): zero-padded waveforms, frame counts by its
    `conv_length`, and `~padding_mask[:, None, None, :]`, or None when nothing is padded."""
    g = torch.Generator().manual_seed(len(lengths))
    waveforms = torch.nn.utils.rnn.pad_sequence([torch.randn(n, generator=g) for n in lengths], batch_first=True)
    frames = torch.tensor(lengths)
    for _, kernel_size, stride in TINY["extractor_conv_layer_config"]:
        frames = (torch.div(frames - kernel_size, stride, rounding_mode="floor") + 1).clamp_min(0)
    padding_mask = torch.arange(int(frames.max())).expand(len(lengths), -1) >= frames[:, None]
    return waveforms, ~padding_mask[:, None, None, :] if bool(padding_mask.any()) else None


@pytest.mark.parametrize("mode", MODES)
def test_all_true_mask_equals_reference(mode: str) -> None:
    ours, ref = pair(mode)
    waveforms = torch.randn(2, 16000, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 1, 49, 49, dtype=torch.bool)
    with torch.no_grad():
        for actual, expected in zip(
            ours.get_intermediate_outputs(waveforms, attention_mask=mask),
            ref.get_intermediate_outputs(waveforms, attention_mask=mask),
            strict=True,
        ):
            close(actual, expected, 1e-5, "intermediate outputs")
        for actual, expected in zip(
            ours.get_codebooks(waveforms, attention_mask=mask), ref.get_codebooks(waveforms, attention_mask=mask)
        ):
            if expected is not None:
                close(actual, expected, 1e-5, "codebook probabilities")


@pytest.mark.parametrize("mode", MODES)
def test_all_true_mask_training_forward_equals_reference(mode: str) -> None:
    ours, ref = pair(mode)
    waveforms = torch.randn(2, 16000, generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 1, 49, 49, dtype=torch.bool)
    mask_indices = torch.arange(0, 49, 4).expand(2, -1)
    losses, ppl = ours.train()(waveforms, mask_indices=mask_indices, attention_mask=mask)
    ref_losses, ref_ppl = ref.train()(waveforms, mask_indices=mask_indices, attention_mask=mask)
    close(losses, ref_losses, 1e-4, "losses")
    close(ppl["target_ppl"], ref_ppl["target_ppl"], 1e-4, "target_ppl")


@pytest.mark.parametrize("mode", MODES)
def test_collator_padded_batch_full_row_equals_reference(mode: str) -> None:
    """The longest row of a padded batch is unpadded: it equals the reference in both modes (the
    padded row differs in group_norm mode on purpose: the reference's statistics include padding)."""
    ours, ref = pair(mode)
    waveforms, mask = collate([16000, 11000])
    assert mask is not None and mask.shape == (2, 1, 1, 49) and not bool(mask.all())
    with torch.no_grad():
        actual = ours.get_intermediate_outputs(waveforms, attention_mask=mask)
        expected = ref.get_intermediate_outputs(waveforms, attention_mask=mask)
        alone = ours.get_intermediate_outputs(waveforms[1:, :11000])
    for layer, (a, e, s) in enumerate(zip(actual, expected, alone, strict=True)):
        close(a[0], e[0], 1e-5, f"full row, layer {layer}")
        if mode == "layer_norm":  # group_norm: a frame mask cannot tell the padded row's real sample count
            real = s.shape[1]
            close(a[1, :real], e[1, :real], 1e-5, f"padded row, layer {layer}")
            close(a[1, :real], s[0], 1e-4, f"padded row vs alone, layer {layer}")


def test_group_norm_full_rows_use_all_samples_without_the_eager_shortcut() -> None:
    """Under torch.compile the all-True check is skipped: the mask path itself must give full rows all samples."""
    ours, ref = pair("group_norm")
    waveforms = torch.randn(2, 16000, generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 1, 49, 49, dtype=torch.bool)
    compiled = torch.compile(lambda w, m: ours.get_intermediate_outputs(w, attention_mask=m), backend="eager")
    with torch.no_grad():
        for actual, expected in zip(
            compiled(waveforms, mask), ref.get_intermediate_outputs(waveforms, attention_mask=mask), strict=True
        ):
            close(actual, expected, 1e-5, "intermediate outputs")
