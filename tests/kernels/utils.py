"""Comparison helpers for the kernel tests."""

from __future__ import annotations

import torch


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.0 if a.numel() == 0 else (a.double() - b.double()).abs().max().item()


def assert_close_to_truth(name: str, got: torch.Tensor, pt: torch.Tensor, truth: torch.Tensor, atol: float) -> None:
    """flash-attn's rule: the kernel's error is at most twice PyTorch's own error at the same dtype (+ atol)."""
    err, pt_err = max_diff(got, truth), max_diff(pt, truth)
    print(f"{name}: max err {err:.3g} (torch at the same dtype: {pt_err:.3g})")
    assert err <= 2 * pt_err + atol, f"{name}: {err:.3g} > 2 * {pt_err:.3g} + {atol:.1g}"
