"""Online codebooks: nearest-codeword labels for the teacher targets, updated by EMA in training.

Each `Codebook` holds the reference's buffers, `codebook` (K, D), a running sum, and `counts` (K,);
a codeword is codebook / counts. `Codebooks` runs all of them at once through the kernels seam and
reduces every statistic of a step across ranks in ONE all-reduce of a packed buffer (the reference
issues two per codebook plus two per perplexity call).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from spidr_fast import kernels


class Codebook(nn.Module):
    """Buffers of one codebook. Init: Gaussian, each coordinate standardised across the K codewords."""

    def __init__(self, dim: int, size: int):
        super().__init__()
        codebook = F.instance_norm(torch.randn(1, dim, size)).squeeze(0).t().contiguous()  # (D, K) -> (K, D)
        self.register_buffer("codebook", codebook)
        self.register_buffer("counts", torch.ones(size))


def perplexity(code_sums: Tensor, num_frames: Tensor) -> Tensor:
    """2 ** entropy of the mean distribution over frames (eps 1e-8 in the log), per codebook: (C, K) -> (C,)."""
    p = code_sums / num_frames
    return torch.exp2(-(p * (p + 1e-8).log2()).sum(-1))


class Codebooks(nn.ModuleList):
    """The C codebooks of a model, assigned and updated together."""

    def __init__(self, num_codebooks: int, dim: int, size: int, decay: float):
        super().__init__(Codebook(dim, size) for _ in range(num_codebooks))
        self.size, self.decay = size, decay

    def stacked(self) -> tuple[Tensor, Tensor]:
        """(C, K, D) sums and (C, K) counts; a copy of ~6 MB at base size, negligible next to a step."""
        return torch.stack([c.codebook for c in self]), torch.stack([c.counts for c in self])

    @torch.no_grad()
    def assign(self, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(C, N, D) targets -> labels (C, N) int64, and this rank's per-codeword counts (C, K) and sums
        (C, K, D) of the targets, in one fused pass and in fp32 whatever the autocast state."""
        codebook, counts = self.stacked()
        with torch.autocast(targets.device.type, enabled=False):
            return kernels.codebook_assign_accumulate(targets.float(), codebook, counts)

    @staticmethod
    @torch.no_grad()
    def all_reduce(*stats: Tensor) -> tuple[Tensor, ...]:
        """Sum the step's statistics over ranks in ONE all-reduce of a packed fp32 buffer."""
        if not (dist.is_available() and dist.is_initialized()):
            return stats
        packed = torch.cat([s.float().reshape(-1) for s in stats])
        dist.all_reduce(packed)
        return tuple(chunk.view_as(s) for chunk, s in zip(packed.split([s.numel() for s in stats]), stats))

    @torch.no_grad()
    def update(self, batch_counts: Tensor, batch_sums: Tensor) -> None:
        """EMA step of every codebook from the (already reduced) statistics of a batch."""
        if self.decay >= 1.0:
            return
        codebook, counts = self.stacked()
        kernels.codebook_ema_update_(codebook, counts, batch_counts, batch_sums, self.decay)
        torch._foreach_copy_([c.codebook for c in self] + [c.counts for c in self], [*codebook, *counts])
