"""Backend selection: one rule for every op (`use_fused`), its defaults per device, the forcing variables."""

from __future__ import annotations

import pytest
import torch

from spidr_fast import DinoSR, DinoSRConfig
from spidr_fast.kernels import _dispatch, attention, codebook, conv_frontend, heads_ce, pos_conv, targets
from spidr_fast.kernels._dispatch import ANY_DEVICE_OPS, OPS, TRITON_OPS, use_fused
from tests.models.test_padding import LENGTHS, TINY, padded_batch

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_cpu_defaults_to_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPIDR_FAST_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter alone does not switch CPU tensors to Triton
    assert not any(use_fused(CPU, op) for op in OPS if op not in ANY_DEVICE_OPS)
    assert all(use_fused(CPU, op) for op in ANY_DEVICE_OPS)


def test_cuda_defaults_to_fused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPIDR_FAST_BACKEND", raising=False)
    assert use_fused(CUDA, "attention") and use_fused(CUDA, "targets")
    assert all(use_fused(CUDA, op) == _dispatch.triton_available() for op in TRITON_OPS)


def test_forced_triton_and_per_op_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPIDR_FAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SPIDR_FAST_REFERENCE_OPS", "codebook,conv_frontend,attention")
    assert not use_fused(CPU, "codebook") and not use_fused(CPU, "conv_frontend") and not use_fused(CPU, "attention")
    assert use_fused(CPU, "heads_ce") and use_fused(CPU, "targets")


@pytest.mark.parametrize("requested", [False, True])
def test_forced_reference_wins(monkeypatch: pytest.MonkeyPatch, requested: bool) -> None:
    monkeypatch.setenv("SPIDR_FAST_BACKEND", "reference")
    assert not any(use_fused(CUDA, op, requested=requested) for op in OPS)


@pytest.mark.parametrize(
    ("variable", "value", "match"),
    [
        ("SPIDR_FAST_BACKEND", "cuda", "SPIDR_FAST_BACKEND must be one of"),
        ("SPIDR_FAST_REFERENCE_OPS", "flash", "unknown op"),
    ],
)
def test_bad_values_are_named(monkeypatch: pytest.MonkeyPatch, variable: str, value: str, match: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=match):
        use_fused(CPU, "codebook")


def test_unknown_op_is_named() -> None:
    with pytest.raises(ValueError, match="unknown op 'softmax'"):
        use_fused(CPU, "softmax")


def test_forced_triton_without_interpreter_on_cpu_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPIDR_FAST_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        use_fused(CPU, "codebook")


def test_reference_backend_runs_no_fused_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny padded training forward + backward (bf16 autocast) under SPIDR_FAST_BACKEND=reference: every
    op asks the one rule and gets its reference; no fused path runs (Triton launchers, packed attention,
    one-pass targets), not even attention's backend forced by its own variable."""
    monkeypatch.setenv("SPIDR_FAST_BACKEND", "reference")
    monkeypatch.setenv("SPIDR_FAST_ATTENTION", "nested")  # alone, this runs packed attention on CPU
    asked: list[tuple[str, bool]] = []
    rule = _dispatch.use_fused

    def spy(device: torch.device, op: str, **kwargs: bool) -> bool:
        asked.append((op, rule(device, op, **kwargs)))
        return asked[-1][1]

    monkeypatch.setattr(_dispatch, "use_fused", spy)
    fused_paths = [
        (codebook, "_assign_launch"),
        (codebook, "_accumulate_launch"),
        (heads_ce, "_fwd_launch"),
        (conv_frontend, "_fwd_launch"),
        (pos_conv, "_fwd_launch"),
        (attention, "_attention_nested"),
        (attention, "_attention_flash_attn"),
        (attention, "_attention_flash_attn_4"),
        (targets, "instance_norm_targets_fast"),
    ]
    for module, name in fused_paths:
        monkeypatch.setattr(module, name, lambda *a, _n=name, **k: pytest.fail(f"fused path {_n} ran"))

    torch.manual_seed(0)
    model = DinoSR(DinoSRConfig(**TINY, extractor_mode="layer_norm")).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the residual stream's dtype is an op under autocast
        losses, _ = model(padded_batch(LENGTHS), lengths=torch.tensor(LENGTHS))
    losses.mean().backward()
    assert {op for op, _ in asked} == set(OPS)
    assert not any(fused for _, fused in asked)


def test_reference_backend_extracts_without_the_channels_last_frontend(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU front-end (extraction/frontend.py) is the extractor's CPU default, off in an all-reference run
    and with SPIDR_FAST_REFERENCE_OPS=frontend_layout."""
    from spidr_fast.extraction import FeatureExtractor

    model = DinoSR(DinoSRConfig(**TINY, extractor_mode="layer_norm")).eval()
    monkeypatch.delenv("SPIDR_FAST_BACKEND", raising=False)
    assert FeatureExtractor(model, layers=[1]).frontend is not None
    monkeypatch.setenv("SPIDR_FAST_BACKEND", "reference")
    assert FeatureExtractor(model, layers=[1]).frontend is None
    # SPIDR_FAST_REFERENCE_OPS=frontend_layout turns the channels-last layout off here too (not only in training)
    monkeypatch.delenv("SPIDR_FAST_BACKEND")
    monkeypatch.setenv("SPIDR_FAST_REFERENCE_OPS", "codebook,frontend_layout")
    assert FeatureExtractor(model, layers=[1]).frontend is None
    monkeypatch.setenv("SPIDR_FAST_REFERENCE_OPS", "codebook")
    assert FeatureExtractor(model, layers=[1]).frontend is not None
    assert FeatureExtractor(model, layers=[1], channels_last_frontend=False).frontend is None
