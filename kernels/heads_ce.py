"""Prediction heads + log-softmax + cross-entropy against codebook labels.

Inputs and outputs (C heads, N frames, H hidden, V = codebook size):
    h       (C, N, H)  any float (each head reads its own layer; DinoSR passes an expanded view)
    weight  (C, V, H), bias (C, V)
    labels  (C, N) int64
    loss    (C, N) fp32        -log_softmax(h W^T + b)[label]
    prob_sums (C, V) fp32      sum over frames of softmax probabilities (for the perplexity)
"""

from __future__ import annotations

import torch
from torch import Tensor


def heads_cross_entropy_ref(h: Tensor, weight: Tensor, bias: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Reference: materialises the (C, N, V) log-probabilities (autograd through plain torch)."""
    logits = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))  # (C, N, V)
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    loss = -log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return loss, log_probs.detach().exp().sum(1)
