from spidr_fast.models.dinosr import DinoSR
from spidr_fast.models.spidr import SpidR

__all__ = ["DinoSR", "SpidR"]
