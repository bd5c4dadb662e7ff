"""spidr_fast: a fast, drop-in reimplementation of SpidR and DinoSR."""

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

__version__ = "0.1.0"

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
