"""FLOPs of one training step, counted once with `torch.utils.flop_counter.FlopCounterMode`, and MFU.

The count runs forward + backward (student) and the teacher forward on the first training batch, on a
copy of the model, before it is compiled or sharded (MFU is then 6N-style "model FLOPs", recomputation
and communication excluded).

`FLOP_FORMULAS` corrects and completes torch's formulas; `bench/roofline.py` counts with the same ones:
- a grouped conv's weight gradient: torch counts it `groups` times too much (the positional conv,
  groups=16, would add ~5 GFLOP per audio-second, ~10% of the step: MFU would read ~11% high);
- CPU SDPA (`_scaled_dot_product_flash_attention_for_cpu`, forward and backward): uncounted by torch;
- spidr_fast's fused custom ops (heads + cross-entropy, codebook assignment, the positional conv layer,
  the first conv block): opaque to the counter.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, sdpa_backward_flop_count, sdpa_flop_count

import spidr_fast.kernels  # noqa: F401  (registers the torch.ops.spidr_fast custom ops counted below)
from spidr_fast import devices
from spidr_fast.train.step import autocast

logger = logging.getLogger(__name__)


def peak_flops(device: torch.device, override: float = 0.0) -> float:
    """Dense bf16 peak FLOP/s for MFU: `override` when set, else the datasheet peak of the GPU
    (`spidr_fast.devices`); 0 (no MFU reported) on a CPU or an unknown GPU."""
    if override > 0:
        return override
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    peaks = devices.lookup(name)
    if peaks is None:
        logger.warning(
            "no datasheet peak for %r in spidr_fast/devices.py: MFU not reported (set run.flops_per_device)", name
        )
        return 0.0
    return peaks.bf16


Shape = list[int]


def conv_backward_flop(
    grad_out_shape: Shape,
    x_shape: Shape,
    w_shape: Shape,
    _bias: object,
    _stride: object,
    _padding: object,
    _dilation: object,
    transposed: bool,
    _output_padding: object,
    _groups: int,
    output_mask: list[bool],
    out_shape: list[Shape | None],
    **kwargs: object,
) -> int:
    """aten.convolution_backward: the input gradient (a transposed conv of grad_out with the weight) plus
    the weight gradient, which costs exactly what the forward costs (2 B C_out (C_in / groups) k T_out
    for a 1-D conv; `w_shape` already holds C_in / groups). Bias gradients are not counted, as torch."""
    flops = 0
    if output_mask[0]:
        flops += conv_flop_count(grad_out_shape, w_shape, out_shape[0], not transposed)
    if output_mask[1]:
        flops += conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return flops


def sdpa_cpu_flop(q: Shape, k: Shape, v: Shape, *args: object, out_shape: object = None, **kwargs: object) -> int:
    return sdpa_flop_count(q, k, v)


def sdpa_cpu_backward_flop(
    grad_out: Shape, q: Shape, k: Shape, v: Shape, *args: object, out_shape: object = None, **kwargs: object
) -> int:
    return sdpa_backward_flop_count(grad_out, q, k, v)


def heads_ce_flop(h: Shape, w: Shape, *args: object, out_shape: object = None, **kwargs: object) -> int:
    """(C, N, H) x (C, V, H) -> logits (C, N, V); the softmax and CE are not counted (as torch's)."""
    C, N, H = h
    return 2 * C * N * H * w[1]


def heads_ce_backward_flop(_g: Shape, h: Shape, w: Shape, *args: object, **kwargs: object) -> int:
    """grad_h and grad_w: two GEMMs of the forward's size (the kernel's recomputed logits not counted)."""
    return 2 * heads_ce_flop(h, w)


def codebook_assign_flop(x: Shape, codebook: Shape, *args: object, out_shape: object = None, **kwargs: object) -> int:
    """Distances of (C, N, D) frames to (C, K, D) codewords: a (N, D) x (D, K) GEMM per codebook."""
    C, N, D = x
    return 2 * C * N * D * codebook[1]


def conv0_flop(x: Shape, w: Shape, _cb: object, _lw: object, _ln: object, stride: int, *args: object,
               out_shape: object = None, **kwargs: object) -> int:  # fmt: skip
    """The first block's conv (C, 1, K) over (B, S) samples, as torch counts the conv it fuses (the LayerNorm and
    GELU not counted, as torch's)."""
    (B, S), (C, _, K) = x, w
    return 2 * B * C * K * max(0, (S - K) // stride + 1)


def conv0_backward_flop(grad_y: Shape, _x: Shape, w: Shape, *args: object, **kwargs: object) -> int:
    """The conv weight's gradient only (the waveform gets none): the forward's count; the recomputed forward not
    counted (model FLOPs)."""
    B, C, T = grad_y
    return 2 * B * C * T * w[2]


def pos_conv_flop(x: Shape, _keep: object, w: Shape, *args: object, out_shape: object = None, **kwargs: object) -> int:
    """The grouped conv of (B, T, D) frames with a (D, Cg, k) weight, 2 B T D Cg k (the norm not counted)."""
    B, T, D = x
    return 2 * B * T * D * w[1] * w[2]


def pos_conv_backward_flop(_g: Shape, x: Shape, _keep: object, w: Shape, *args: object, **kwargs: object) -> int:
    """grad_x (the forward's conv with the transposed weight) and grad_weight: twice the forward's."""
    return 2 * pos_conv_flop(x, None, w)


_ops = torch.ops.spidr_fast
FLOP_FORMULAS = {
    torch.ops.aten.convolution_backward: conv_backward_flop,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa_cpu_flop,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: sdpa_cpu_backward_flop,
    _ops.heads_ce: heads_ce_flop,
    _ops.heads_ce_backward: heads_ce_backward_flop,
    _ops.codebook_assign: codebook_assign_flop,
    _ops.codebook_assign_accumulate: codebook_assign_flop,
    _ops.conv0_layer_norm_gelu: conv0_flop,
    _ops.conv0_layer_norm_gelu_backward: conv0_backward_flop,
    _ops.pos_conv: pos_conv_flop,
    _ops.pos_conv_backward: pos_conv_backward_flop,
}  # formulas over shapes (FlopCounterMode's custom_mapping convention)


class _GlobalOnly:
    """Stands in for FlopCounterMode's module tracker, whose hooks trip on modules called under no_grad
    with inputs that require grad (the teacher); only the global total is needed."""

    parents = frozenset({"Global"})

    def __enter__(self) -> None:
        pass

    def __exit__(self, *args: object) -> None:
        pass


def step_flop_counter() -> FlopCounterMode:
    """A FlopCounterMode with `FLOP_FORMULAS` that keeps only the global total."""
    counter = FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)
    counter.mod_tracker = _GlobalOnly()
    return counter


def count_step_flops(model: nn.Module, waveforms: Tensor, mask_indices: Tensor, dtype: torch.dtype) -> int:
    """FLOPs of forward + backward of `model` (train mode) on one batch. Runs the step for real on a
    deep copy, with the RNG forked: the caller's model, codebooks and random streams are untouched.
    Rank-local: no collective runs, whatever the process group."""
    model = copy.deepcopy(model).train()
    if hasattr(model, "codebooks"):
        # This rank's codebook statistics only: the count runs no collective, so a rank whose count fails
        # (or that counts another batch) cannot leave the others waiting in an all-reduce.
        model.codebooks.all_reduce = lambda *stats: stats
    devices = [waveforms.device] if waveforms.device.type == "cuda" else []
    counter = step_flop_counter()
    try:
        with torch.random.fork_rng(devices=devices), counter, autocast(waveforms.device, dtype):
            losses, _ = model(waveforms, mask_indices=mask_indices)
            losses.float().sum().backward()
    except Exception as e:  # an op FlopCounterMode cannot run: report no MFU rather than fail the run
        logger.warning("FLOP count failed (%s: %s): MFU will not be reported", type(e).__name__, e)
        return 0
    return counter.get_total_flops()
