"""LayerNorm whose output, under autocast, is in the compute dtype: the residual stream in bf16."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from spidr_fast.kernels import _dispatch


class LayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` (same parameters, state-dict keys and outputs outside autocast) whose output under
    autocast is in the autocast dtype instead of fp32; the math stays fp32.

    Autocast runs layer_norm in fp32 and returns fp32, so a post-LN transformer's residual stream is fp32:
    each layer's residual adds, dropouts and LayerNorms read and write it at 4 bytes a value, and each Linear
    reading it casts it to bf16 first. Rounded at the LayerNorm, the stream is bf16 end to end (half the
    bytes); the Linears read the same bf16 values as before, only the residual adds see rounded inputs.
    `SPIDR_FAST_REFERENCE_OPS=residual_dtype` (or `SPIDR_FAST_BACKEND=reference`) keeps autocast's fp32
    outputs (the reference's behaviour).
    """

    def forward(self, x: Tensor) -> Tensor:
        device = x.device.type
        if not torch.is_autocast_enabled(device):
            return super().forward(x)
        # fp32 math on every device: CUDA autocast's own rule for layer_norm (CPU's keeps the input dtype)
        y = super().forward(x.float())
        if not _dispatch.use_fused(x.device, "residual_dtype"):
            return y
        return y.to(torch.get_autocast_dtype(device))
