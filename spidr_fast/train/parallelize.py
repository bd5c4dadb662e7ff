"""Transforms on a built model, in this order: regional compile, then FSDP2 (or DDP).

`parallelize(model, ...)` returns what the trainer calls. The model files contain no compile, FSDP or
autocast line. Order (torchtitan's): `torch.compile` each region of `COMPILED_REGIONS` (fullgraph: every
`TransformerLayer` of the student and the teacher, and the glue between them, `GLUE_REGIONS`) ->
`fully_shard` each layer of the student AND the teacher (same sharding, so the teacher EMA is a local
`_foreach_lerp_` over shards) -> `fully_shard` the root (extractor, projection, heads, positional convs,
codebook buffers stay replicated).

What stays eager between the regions is host-side or cross-rank: the input checks and the batch's
`Padding` (built once per batch: its packed metadata is a host sync), the layer loops (layer drop is drawn
on a CPU generator), the codebook statistics' all-reduce and EMA update. FSDP2's hooks run on the root and
on each layer, outside the compiled code (the glue regions are parts of the root's forward, called with the
root's parameters already gathered). bench/roofline_trace.py imports `COMPILED_REGIONS`: its fusion regions are
exactly these.
"""

from __future__ import annotations

import torch
from torch import nn

from spidr_fast.models import DinoSR

# The compiled regions, each a path on the model: a module (its call is compiled, as `nn.Module.compile`
# does) or a method (the bound method is replaced, on its instance only, by its compiled version); "*" is
# every index of a ModuleList. Each region is one graph (fullgraph) forward and one backward.
# No region holds a trained conv: Inductor's conv1d backward lowering guards on the sequence length (torch
# 2.13, `convolution_backward` in torch/_inductor/kernel/conv.py), so a dynamic region with one recompiles at
# every new length. The conv front-end stays eager (its convs and fused LayerNorm + GELU custom ops leave
# nothing to fuse), and so does the student's positional conv (`kernels.pos_conv_layer`: a custom op on CUDA,
# but the aten conv on its reference path); the teacher's (no backward) is compiled.
LAYER_REGIONS = ("student.layers.*", "teacher.layers.*")
GLUE_REGIONS = (
    "feature_projection",  # LayerNorm + Linear to the encoder width
    "_student_input",  # projection dropout + the mask embedding at masked frames
    "student._embed_norm",  # positional embedding added + LayerNorm + dropout
    "teacher._embed",  # positional conv (its custom ops inside) + the same
    "_targets",  # instance norm of the teacher's top layers at masked frames + codebook assignment (custom op)
    "_heads_loss",  # masked-frame gathers + the heads' weights stacked + heads and cross-entropy (custom op)
)
COMPILED_REGIONS = LAYER_REGIONS + GLUE_REGIONS


def transformer_layers(model: DinoSR) -> list[nn.Module]:
    return [*model.student.layers, *model.teacher.layers]


def region_paths(model: nn.Module, regions: tuple[str, ...] = COMPILED_REGIONS) -> list[tuple[str, object, str]]:
    """(path, owner, attribute) of every region, "*" expanded: `getattr(owner, attribute)` is the module or
    the bound method that the region compiles."""
    out: list[tuple[str, object, str]] = []
    for region in regions:
        *parents, leaf = region.split(".")
        owners: list[tuple[str, object]] = [("", model)]
        for part in parents:
            owners = [(f"{p}{part}.", getattr(o, part)) for p, o in owners]
        if leaf == "*":
            out += [(f"{p}{i}", o, str(i)) for p, o in owners for i in range(len(o))]  # type: ignore[arg-type]
        else:
            for p, o in owners:
                if not callable(getattr(o, leaf, None)):
                    raise ValueError(f"compiled region {region!r}: {type(o).__name__} has no callable {leaf!r}")
                out.append((f"{p}{leaf}", o, leaf))
    return out


def apply_compile(
    model: DinoSR, *, backend: str = "inductor", dynamic: bool = True, regions: tuple[str, ...] = COMPILED_REGIONS
) -> None:
    """Compile every region in place (fullgraph: a graph break is an error). `dynamic=True` makes (batch,
    frames, samples) symbolic from the first call, so batches of any shape reuse the same graphs."""
    for _, owner, attr in region_paths(model, regions):
        target = getattr(owner, attr)  # a ModuleList's children are attributes "0", "1", ...
        if isinstance(target, nn.Module):
            target.compile(backend=backend, fullgraph=True, dynamic=dynamic)
        else:  # a bound method: its compiled version shadows it on this instance only
            setattr(owner, attr, torch.compile(target, backend=backend, fullgraph=True, dynamic=dynamic))


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
    compile_glue: bool = True,
) -> tuple[nn.Module, float]:
    """Apply compile then FSDP2/DDP; returns (the module to call, the gradient scale of the loss).

    The scale is the world size when the gradient reduction averages over ranks (FSDP2 and DDP do),
    so that the loss normalised by the global frame count gives the global-mean gradient.
    `compile_glue=False` compiles the transformer layers only.
    """
    if compile:
        regions = COMPILED_REGIONS if compile_glue else LAYER_REGIONS
        apply_compile(model, backend=compile_backend, dynamic=compile_dynamic, regions=regions)
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
