"""spidr_fast.kernels: the hot-path ops, each a fused kernel beside its plain-PyTorch reference.

The model calls only the functions exported here. Each dispatches to Triton where it runs (see
`_dispatch`), otherwise to the reference. Kernels never import the model, trainer or configs.
"""

from spidr_fast.kernels.attention import attention_ref
from spidr_fast.kernels.codebook import codebook_accumulate_ref, codebook_assign_ref, codebook_ema_update_
from spidr_fast.kernels.heads_ce import heads_cross_entropy_ref

# The seams of the model. Fused implementations replace these names as they land.
codebook_assign = codebook_assign_ref
codebook_accumulate = codebook_accumulate_ref
heads_cross_entropy = heads_cross_entropy_ref
attention = attention_ref

__all__ = [
    "attention",
    "attention_ref",
    "codebook_accumulate",
    "codebook_accumulate_ref",
    "codebook_assign",
    "codebook_assign_ref",
    "codebook_ema_update_",
    "heads_cross_entropy",
    "heads_cross_entropy_ref",
]
