"""Transforms on a built model, in this order: compile per transformer layer, then FSDP2 (or DDP).

`parallelize(model, ...)` returns what the trainer calls. The model files contain no compile, FSDP or
autocast line. Order (torchtitan's): `torch.compile` each `TransformerLayer` (student and teacher,
fullgraph) -> `fully_shard` each layer of the student AND the teacher (same sharding, so the teacher
EMA is a local `_foreach_lerp_` over shards) -> `fully_shard` the root (extractor, projection, heads,
positional convs, codebook buffers stay replicated).
"""

from __future__ import annotations

import torch
from torch import nn

from spidr_fast.models import DinoSR


def transformer_layers(model: DinoSR) -> list[nn.Module]:
    return [*model.student.layers, *model.teacher.layers]


def apply_compile(model: DinoSR, *, backend: str = "inductor", dynamic: bool = True) -> None:
    """Compile every transformer layer in place (fullgraph). `dynamic=True` makes (batch, frames)
    symbolic from the first call, so batches of any shape reuse the same graph: no recompilation."""
    for layer in transformer_layers(model):
        layer.compile(backend=backend, fullgraph=True, dynamic=dynamic)


def apply_fsdp(model: DinoSR, *, param_dtype: torch.dtype, reduce_dtype: torch.dtype = torch.float32) -> None:
    """FSDP2: shard each layer of the student and the teacher, then the root (gradients averaged)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for i, layer in enumerate(model.student.layers):
        # The last layer's parameters are needed first in backward: do not reshard them after forward.
        fully_shard(layer, mp_policy=mp, reshard_after_forward=i < len(model.student.layers) - 1)
    for layer in model.teacher.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    for method in ("get_codebooks", "get_intermediate_outputs"):  # inference entry points also gather the root
        register_fsdp_forward_method(model, method)


def apply_ddp(model: DinoSR, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=model.cfg.encoder_layer_drop > 0,
        broadcast_buffers=False,  # codebooks are updated from all-reduced statistics: already equal
    )


@torch.no_grad()
def broadcast_from_rank0(model: nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers (codebooks included): FSDP2 never syncs them (each
    rank shards its own copy) and DDP with broadcast_buffers=False skips the buffers, so this is what
    guarantees one model at step 0 whatever each rank built (the trainer also seeds the build alike)."""
    import torch.distributed as dist

    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor, src=0)


def parallelize(
    model: DinoSR,
    *,
    parallelism: str,
    world_size: int,
    device: torch.device,
    param_dtype: torch.dtype,
    compile: bool,
    compile_backend: str = "inductor",
    compile_dynamic: bool = True,
) -> tuple[nn.Module, float]:
    """Apply compile then FSDP2/DDP; returns (the module to call, the gradient scale of the loss).

    The scale is the world size when the gradient reduction averages over ranks (FSDP2 and DDP do),
    so that the loss normalised by the global frame count gives the global-mean gradient.
    """
    if compile:
        apply_compile(model, backend=compile_backend, dynamic=compile_dynamic)
    if parallelism == "none" and world_size > 1:
        raise ValueError("run.parallelism='none' needs a single process")
    if world_size == 1:  # nothing to shard or reduce
        return model, 1.0
    broadcast_from_rank0(model)
    if parallelism == "fsdp":
        apply_fsdp(model, param_dtype=param_dtype)
        return model, float(world_size)
    if parallelism == "ddp":
        return apply_ddp(model, device), float(world_size)
    raise ValueError(f"unknown run.parallelism {parallelism!r}: fsdp, ddp or none")


def rewrap_after_freeze(called: nn.Module, model: DinoSR, device: torch.device) -> nn.Module:
    """Call after the step at which the extractor froze: a DDP wrapper must be rebuilt to stop expecting
    gradients for the frozen parameters (FSDP2 and the plain model need nothing)."""
    from torch.nn.parallel import DistributedDataParallel

    return apply_ddp(model, device) if isinstance(called, DistributedDataParallel) else called
