"""Side by side with the reference package (`spidr` 0.2.0, installed by the Makefile, never vendored).

A model built by the reference and saved in its released format loads into spidr_fast and gives the
same outputs, losses, perplexities, codebook updates, gradients and teacher EMA; a model saved by
spidr_fast loads into the reference and gives the same outputs. Configurations beyond the fixture's:
pre-LN, qkv bias, group norm, an even positional kernel, DinoSR with layer drop, and the base size.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import spidr_fast
from spidr_fast.config import model_config_from_dict
from spidr_fast.train.config import preset_model_fields

spidr = pytest.importorskip("spidr", reason="the reference package: `make test` installs spidr==0.2.0")
from spidr.config import DinoSRConfig as RefDinoSRConfig  # noqa: E402
from spidr.config import SpidRConfig as RefSpidRConfig  # noqa: E402
from spidr.models import DinoSR as RefDinoSR  # noqa: E402
from spidr.models import SpidR as RefSpidR  # noqa: E402
from spidr.models.utils import build_model as ref_build_model  # noqa: E402

TINY = preset_model_fields("tiny", encoder_num_layers=3)  # 3 codebooks in one variant
NO_DROPOUT = {
    "encoder_projection_dropout": 0.0,
    "encoder_attention_dropout": 0.0,
    "encoder_ff_interm_dropout": 0.0,
    "encoder_dropout": 0.0,
}
VARIANTS = {
    "spidr-pre-ln": ("spidr", {**TINY, "encoder_layer_norm_first": True}),
    "spidr-qkv-bias": ("spidr", {**TINY, "encoder_qkv_bias": True}),
    "spidr-group-norm": ("spidr", {**TINY, "extractor_mode": "group_norm"}),
    "spidr-even-pos-kernel": ("spidr", {**TINY, "encoder_pos_conv_kernel": 20, "num_codebooks": 3}),
    "dinosr-layer-drop": ("dinosr", {**TINY, "encoder_layer_drop": 0.3}),
    "dinosr-pre-ln-qkv-bias": ("dinosr", {**TINY, "encoder_layer_norm_first": True, "encoder_qkv_bias": True}),
}
REF_CLASSES = {"spidr": (RefSpidR, RefSpidRConfig), "dinosr": (RefDinoSR, RefDinoSRConfig)}


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = "") -> None:
    scale = expected.abs().max().clamp_min(1e-12)
    err = ((actual - expected).abs().max() / scale).item()
    assert err <= rtol, f"{what}: max error {err:.3g} x scale > {rtol}"


def reference_model(model_type: str, fields: dict) -> tuple[torch.nn.Module, dict]:
    """A reference model with perturbed codebook counts, and its full config as the reference writes it."""
    model_class, config_class = REF_CLASSES[model_type]
    cfg = config_class(**fields)
    model = model_class(cfg)
    with torch.no_grad():  # perturb the codebook counts so that the EMA and the assignment are not trivial
        for codebook in model.codebooks:
            codebook.counts.uniform_(0.5, 3.0)
    return model, dataclasses.asdict(cfg)


def save_reference(model: torch.nn.Module, fields: dict, folder: Path) -> Path:
    """The reference's released format: {"model": state_dict} + config.json beside it."""
    path = folder / "model.pt"
    torch.save({"model": model.state_dict()}, path)
    (folder / "config.json").write_text(json.dumps({"model": fields}))
    return path


def batch(seed: int, num_frames_masked: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    waveforms = torch.randn(2, 16000, generator=g)
    frames = 49
    mask_indices = torch.rand(2, frames, generator=g).argsort(-1)[:, :num_frames_masked].sort(-1).values
    return waveforms, mask_indices


def compare_inference(ours: torch.nn.Module, ref: torch.nn.Module, waveforms: torch.Tensor) -> None:
    ours.eval()
    ref.eval()
    with torch.no_grad():
        for actual, expected in zip(
            ours.get_intermediate_outputs(waveforms), ref.get_intermediate_outputs(waveforms), strict=True
        ):
            close(actual, expected, 1e-4, "intermediate outputs")
        for actual, expected in zip(ours.get_codebooks(waveforms), ref.get_codebooks(waveforms), strict=True):
            assert (actual is None) == (expected is None)
            if expected is not None:
                close(actual, expected, 1e-4, "codebook probabilities")


def compare_training(ours: torch.nn.Module, ref: torch.nn.Module, seed: int) -> None:
    waveforms, mask_indices = batch(seed)
    ours.train()
    ref.train()
    torch.manual_seed(seed)
    ref_losses, ref_ppl = ref(waveforms, mask_indices=mask_indices)
    torch.manual_seed(seed)  # same CPU RNG stream: layer drop decisions match
    losses, ppl = ours(waveforms, mask_indices=mask_indices)
    close(losses, ref_losses, 1e-4, "losses")
    for name in ("target_ppl", "pred_ppl"):
        close(ppl[name], ref_ppl[name], 1e-4, name)
    ref_buffers = ref.state_dict()
    for name, value in ours.state_dict().items():
        if name.startswith("codebooks."):
            close(value, ref_buffers[name], 1e-5, name)
    losses.mean().backward()
    ref_losses.mean().backward()
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert (p.grad is None) == (ref_params[name].grad is None), name
        if p.grad is not None:
            close(p.grad, ref_params[name].grad, 2e-3, f"grad {name}")
    for step in (10, 35_000, 250_000):
        assert ours.update_ema(step) == pytest.approx(ref.update_ema(step), abs=1e-12)
    ref_teacher = ref.teacher.state_dict()
    for name, value in ours.teacher.state_dict().items():
        close(value, ref_teacher[name], 1e-5, f"teacher {name}")
    assert [p.requires_grad for p in ours.parameters()] == [p.requires_grad for p in ref.parameters()]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_reference_checkpoint_loads_and_matches(variant: str, tmp_path: Path) -> None:
    model_type, fields = VARIANTS[variant]
    torch.manual_seed(1)
    ref, ref_fields = reference_model(model_type, {**fields, **NO_DROPOUT})
    path = save_reference(ref, ref_fields, tmp_path)
    ours = spidr_fast.load_model(path)  # model type inferred from config.json
    assert type(ours).__name__ == type(ref).__name__
    compare_inference(ours, ref, batch(0)[0])
    compare_training(ours, ref, seed=2)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_spidr_fast_checkpoint_loads_into_reference(variant: str, tmp_path: Path) -> None:
    model_type, fields = VARIANTS[variant]
    torch.manual_seed(3)
    ours = spidr_fast.checkpoint.build_model(model_config_from_dict(fields, model_type))
    path = spidr_fast.save_model(ours, tmp_path / "ours.pt")
    ref = ref_build_model(checkpoint=path, model_type=model_type)  # reads config.json beside the file
    assert torch.equal(ref.state_dict()["current_step"], ours.state_dict()["current_step"])
    compare_inference(ours, ref, batch(4)[0])
    back = spidr_fast.load_model(path)
    for name, value in ours.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name


@pytest.mark.slow
def test_base_size_matches_reference(tmp_path: Path) -> None:
    """The released spidr_base architecture (95M-parameter student), on one second of audio."""
    torch.manual_seed(5)
    ref, ref_fields = reference_model("spidr", dict(NO_DROPOUT))
    path = save_reference(ref, ref_fields, tmp_path)
    ours = spidr_fast.load_model(path)
    assert ours.cfg == spidr_fast.SpidRConfig(**NO_DROPOUT)
    compare_inference(ours, ref, batch(6)[0][:1])
    compare_training(ours, ref, seed=7)
