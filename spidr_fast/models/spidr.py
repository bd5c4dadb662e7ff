"""SpidR: DinoSR where head i reads the student's layer of teacher target i, and an exponential EMA."""

from __future__ import annotations

import math

from torch import Tensor, nn

from spidr_fast.config import SpidRConfig
from spidr_fast.kernels.attention import Padding
from spidr_fast.models.dinosr import DinoSR


def spidr_ema_decay(step: int, start: float, timescale: float, threshold: float) -> float:
    """1 - (1 - start) exp(-step / timescale); 1 (the EMA stops) once 1 - decay <= threshold."""
    decay = 1 - (1 - start) * math.exp(-step / timescale)
    return decay if 1 - decay > threshold else 1.0


class SpidR(DinoSR):
    config_class = SpidRConfig

    def __init__(self, cfg: SpidRConfig | None = None):
        super().__init__(cfg)
        # The student's last normalisation never reaches the loss: the reference does not train it.
        self.student.final_norm.requires_grad_(False)

    def ema_decay(self, step: int) -> float:
        c = self.cfg
        return spidr_ema_decay(step, c.ema_start_decay, c.ema_timescale, c.ema_threshold)

    def _head_inputs_for_inference(self, features: Tensor, padding: Padding | None) -> list[Tensor]:
        return self.student.get_intermediate_outputs(features, padding)[-self.num_codebooks :]

    def parameters_unreached_by_the_loss(self) -> list[nn.Parameter]:
        """The heads read FFN outputs: a dropped layer's output (and its final LayerNorm) is unused."""
        return self.student.parameters_after_ffn_of_dropped_layers()

    def _student_outputs(self, x: Tensor, padding: Padding | None) -> list[Tensor]:
        """SpidR: head i reads the student's layer of teacher target i (the last `num_codebooks` layers)."""
        return self.student.get_intermediate_outputs(x, padding)[-self.num_codebooks :]
