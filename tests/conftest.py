"""Shared test setup: an install guard, deterministic seeds, the tiny-spidr fixture."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

try:
    import spidr_fast.kernels  # noqa: F401  (kernels/ exists as spidr_fast.kernels only once installed)
except ModuleNotFoundError as e:  # pragma: no cover
    if e.name not in ("spidr_fast", "spidr_fast.kernels"):  # installed, but a dependency is missing: say which
        raise pytest.UsageError(f"importing spidr_fast.kernels failed: {type(e).__name__}: {e}") from e
    raise pytest.UsageError("spidr_fast is not installed: run `make test` (or `pip install -e .`) first") from e

FIXTURE_DIR = Path(__file__).parent / "fixtures" / "tiny-spidr"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def cases() -> dict:
    return torch.load(FIXTURE_DIR / "cases.pt", weights_only=False)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
