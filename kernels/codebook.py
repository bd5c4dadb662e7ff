"""Codebook assignment and EMA statistics.

Inputs and outputs (C codebooks, N frames, K codewords, D dims):
    x        (C, N, D) fp32/bf16/fp16  teacher targets (instance-normalised)
    codebook (C, K, D) fp32            running sums; a codeword is codebook / counts
    counts   (C, K)    fp32
    labels   (C, N)    int64           argmin_k ||x - codebook_k / counts_k||_2, ties to the lowest k
    sums     (C, K, D) fp32, batch_counts (C, K) fp32: per-codeword sums and counts of x

The references below are the CPU path and the ground truth for the Triton kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def codebook_assign_ref(x: Tensor, codebook: Tensor, counts: Tensor) -> Tensor:
    """Nearest codeword per frame, in fp32, exactly as the reference (`cdist(...).argmin`)."""
    centers = codebook / counts.unsqueeze(-1)  # (C, K, D)
    return torch.cdist(x.float(), centers, p=2).argmin(-1)


def codebook_accumulate_ref(x: Tensor, labels: Tensor, num_codes: int) -> tuple[Tensor, Tensor]:
    """Per-codeword counts (C, K) and sums (C, K, D) of the frames assigned to each codeword (fp32)."""
    onehot = F.one_hot(labels, num_codes).float()  # (C, N, K)
    return onehot.sum(1), torch.bmm(onehot.transpose(1, 2), x.float())


def codebook_ema_update_(
    codebook: Tensor, counts: Tensor, batch_counts: Tensor, batch_sums: Tensor, decay: float
) -> None:
    """In place: for codewords assigned at least once, counts = d counts + (1-d) n, codebook likewise.

    Follows the reference's fp32 arithmetic (alpha is an fp32 tensor, so 0.9 is 0.89999998 and
    1 - alpha is computed in fp32); unassigned codewords keep alpha = 1 and do not move.
    """
    alpha = torch.where(batch_counts != 0, torch.full_like(batch_counts, decay), torch.ones_like(batch_counts))
    counts.copy_(alpha * counts + (1 - alpha) * batch_counts)
    alpha = alpha.unsqueeze(-1)
    codebook.copy_(alpha * codebook + (1 - alpha) * batch_sums)
