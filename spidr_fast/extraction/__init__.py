"""Feature and unit extraction: the `FeatureExtractor` API and the `spidr-fast extract` pipeline.

The public names are imported on first use (PEP 562): `spidr-fast extract --help`, which reads
`extraction.settings`, loads no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["FeatureExtractor", "plan_pieces"]

if TYPE_CHECKING:
    from spidr_fast.extraction.extractor import FeatureExtractor, plan_pieces


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("spidr_fast.extraction.extractor"), name)
    raise AttributeError(f"module 'spidr_fast.extraction' has no attribute {name!r}")
