"""spidr_fast.kernels: the hot-path ops, each a fused kernel beside its plain-PyTorch reference.

The model calls only the functions exported here. Each dispatches to Triton where it runs (see
`_dispatch`), otherwise to the reference. Kernels never import the model, trainer or configs.
Every fused op is a `torch.library.custom_op` (namespace `spidr_fast`) with a fake kernel, so
`torch.compile(fullgraph=True)` traces through it.
"""

from spidr_fast.kernels import attention as _attention
from spidr_fast.kernels.codebook import (
    codebook_accumulate,
    codebook_accumulate_ref,
    codebook_assign,
    codebook_assign_accumulate,
    codebook_assign_accumulate_ref,
    codebook_assign_ref,
    codebook_ema_update_,
)
from spidr_fast.kernels.heads_ce import heads_cross_entropy, heads_cross_entropy_ref, linear_cross_entropy
from spidr_fast.kernels.targets import instance_norm, instance_norm_targets, instance_norm_targets_ref

attention_ref = _attention.attention_ref
attention = getattr(_attention, "attention", attention_ref)  # the dispatching one once attention.py defines it

__all__ = [
    "attention",
    "attention_ref",
    "codebook_accumulate",
    "codebook_accumulate_ref",
    "codebook_assign",
    "codebook_assign_accumulate",
    "codebook_assign_accumulate_ref",
    "codebook_assign_ref",
    "codebook_ema_update_",
    "heads_cross_entropy",
    "heads_cross_entropy_ref",
    "instance_norm",
    "instance_norm_targets",
    "instance_norm_targets_ref",
    "linear_cross_entropy",
]
