"""Every item of the reference's tiny-spidr fixture, reproduced by spidr_fast."""

from __future__ import annotations

import pytest
import torch

import spidr_fast
from spidr_fast.models.padding import attention_mask_from_lengths
from tests.conftest import FIXTURE_DIR


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Relative to the tensor's scale: |a - e| <= rtol * max|e| (elementwise rtol fails near zero)."""
    scale = expected.abs().max().clamp_min(1e-12)
    err = ((actual - expected).abs().max() / scale).item()
    assert err <= rtol, f"max error {err:.3g} x scale > {rtol}"


@pytest.fixture
def model() -> spidr_fast.SpidR:
    model = spidr_fast.load_model(FIXTURE_DIR / "model.pt")
    assert isinstance(model, spidr_fast.SpidR)
    return model


@pytest.fixture
def attention_mask(cases: dict) -> torch.Tensor:
    return attention_mask_from_lengths(torch.tensor(cases["frames"]), cases["intermediate"][0].shape[1])


def test_frames(model: spidr_fast.SpidR, cases: dict) -> None:
    frames = model.feature_extractor.output_lengths(torch.tensor(cases["lengths"]))
    assert frames.tolist() == cases["frames"]


@pytest.mark.parametrize("before_residual", [True, False])
def test_intermediate_outputs_padded(model, cases, attention_mask, before_residual: bool) -> None:
    key = "intermediate" if before_residual else "intermediate_after_residual"
    with torch.no_grad():
        outputs = model.get_intermediate_outputs(
            cases["waveforms"], attention_mask=attention_mask, before_residual=before_residual
        )
    assert len(outputs) == len(cases[key])
    for actual, expected in zip(outputs, cases[key], strict=True):
        close(actual, expected, 1e-4)  # padded frames included: they match the reference too


def test_intermediate_outputs_lengths_form(model, cases) -> None:
    with torch.no_grad():
        outputs = model.get_intermediate_outputs(cases["waveforms"], lengths=torch.tensor(cases["lengths"]))
    for actual, expected in zip(outputs, cases["intermediate"], strict=True):
        for i, frames in enumerate(cases["frames"]):
            close(actual[i, :frames], expected[i, :frames], 1e-4)


def test_single_utterances(model, cases) -> None:
    for i, (length, expected_layers) in enumerate(zip(cases["lengths"], cases["single_intermediate"], strict=True)):
        with torch.no_grad():
            outputs = model.get_intermediate_outputs(cases["waveforms"][i : i + 1, :length])
        for actual, expected in zip(outputs, expected_layers, strict=True):
            close(actual, expected, 1e-4)


@pytest.mark.parametrize("onehot", [False, True])
def test_codebooks(model, cases, attention_mask, onehot: bool) -> None:
    key = "codebooks_onehot" if onehot else "codebooks"
    with torch.no_grad():
        outputs = model.get_codebooks(cases["waveforms"], attention_mask=attention_mask, onehot=onehot)
    assert [o is None for o in outputs] == [e is None for e in cases[key]]
    for actual, expected in zip(outputs, cases[key], strict=True):
        if expected is None:
            continue
        if onehot:
            assert actual.dtype == expected.dtype
            assert torch.equal(actual, expected)
        else:
            close(actual, expected, 1e-4)


def test_training_forward_losses_codebooks_grads(model, cases) -> None:
    for name, expected in cases["codebooks_before"].items():
        assert torch.equal(model.state_dict()[name], expected)
    model.train()
    losses, ppl = model(cases["train_waveforms"], mask_indices=cases["mask_indices"])
    close(losses, cases["train_losses"], 1e-4)
    for name in ("target_ppl", "pred_ppl"):
        close(ppl[name], cases["train_ppl"][name], 1e-4)
    for name, expected in cases["codebooks_after"].items():
        close(model.state_dict()[name], expected, 1e-5)

    losses.mean().backward()
    trained = {name: p for name, p in model.named_parameters() if p.grad is not None}
    assert set(trained) == set(cases["grads"])  # the student's last norm and the teacher get no gradient
    for name, expected in cases["grads"].items():
        close(trained[name].grad, expected, 2e-3)


def test_update_ema(model, cases) -> None:
    decay = model.update_ema(cases["ema_step"])
    assert decay == pytest.approx(cases["ema_decay"], abs=1e-12)
    teacher = model.teacher.state_dict()
    assert set(teacher) == set(cases["teacher_after_ema"])
    for name, expected in cases["teacher_after_ema"].items():
        close(teacher[name], expected, 1e-5)
