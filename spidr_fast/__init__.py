"""spidr_fast: a fast, drop-in reimplementation of SpidR and DinoSR.

The public names below are imported on first use (PEP 562), so that `import spidr_fast` and
`spidr-fast --help` / `--version` do not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY: dict[str, str] = {
    "DinoSR": "spidr_fast.models",
    "DinoSRConfig": "spidr_fast.config",
    "FeatureExtractor": "spidr_fast.extraction",
    "SpidR": "spidr_fast.models",
    "SpidRConfig": "spidr_fast.config",
    "dinosr_base_original": "spidr_fast.checkpoint",
    "dinosr_base_reproduced": "spidr_fast.checkpoint",
    "load_model": "spidr_fast.checkpoint",
    "read_model_config": "spidr_fast.config",
    "save_model": "spidr_fast.checkpoint",
    "spidr_base": "spidr_fast.checkpoint",
}

__all__ = [
    "DinoSR",
    "DinoSRConfig",
    "FeatureExtractor",
    "SpidR",
    "SpidRConfig",
    "__version__",
    "dinosr_base_original",
    "dinosr_base_reproduced",
    "load_model",
    "read_model_config",
    "save_model",
    "spidr_base",
]

if TYPE_CHECKING:
    from spidr_fast.checkpoint import (
        dinosr_base_original,
        dinosr_base_reproduced,
        load_model,
        save_model,
        spidr_base,
    )
    from spidr_fast.config import DinoSRConfig, SpidRConfig, read_model_config
    from spidr_fast.extraction import FeatureExtractor
    from spidr_fast.models import DinoSR, SpidR


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'spidr_fast' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
