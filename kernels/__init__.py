"""spidr_fast.kernels: the hot-path ops, each a fused kernel beside its plain-PyTorch reference.

The model calls only the functions exported here. Each runs its fused path or its reference by
one rule (`_dispatch.use_fused`: `SPIDR_FAST_BACKEND=reference` gives an all-reference run).
Kernels never import the model, trainer or configs. Every Triton kernel (and FlashAttention-3/4) runs
as a `torch.library.custom_op` (namespace `spidr_fast`) with a fake kernel, so
`torch.compile(fullgraph=True)` traces through it.
"""

from spidr_fast.kernels.attention import self_attention, self_attention_ref
from spidr_fast.kernels.codebook import (
    codebook_accumulate,
    codebook_accumulate_ref,
    codebook_assign,
    codebook_assign_accumulate,
    codebook_assign_accumulate_ref,
    codebook_assign_ref,
    codebook_ema_update_,
)
from spidr_fast.kernels.conv0 import conv0_layer_norm_gelu, conv0_layer_norm_gelu_ref
from spidr_fast.kernels.heads_ce import heads_cross_entropy, heads_cross_entropy_ref
from spidr_fast.kernels.pos_conv import pos_conv_layer, pos_conv_layer_ref
from spidr_fast.kernels.targets import instance_norm, instance_norm_targets, instance_norm_targets_ref

__all__ = [
    "codebook_accumulate",
    "codebook_accumulate_ref",
    "codebook_assign",
    "codebook_assign_accumulate",
    "codebook_assign_accumulate_ref",
    "codebook_assign_ref",
    "codebook_ema_update_",
    "conv0_layer_norm_gelu",
    "conv0_layer_norm_gelu_ref",
    "heads_cross_entropy",
    "heads_cross_entropy_ref",
    "instance_norm",
    "instance_norm_targets",
    "instance_norm_targets_ref",
    "pos_conv_layer",
    "pos_conv_layer_ref",
    "self_attention",
    "self_attention_ref",
]
