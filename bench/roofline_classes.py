"""Classes of ops (in the roofline trace) and of kernels (in a profile), and the region of the model an op is in.

`CLASSES` are the kinds of kernel an op launches, the unit `bench/roofline.py` predicts and `make gpu-check`
measures: `op_class` gives an aten / spidr_fast op's, `classify` a profiled CUDA kernel's (by its name, `KERNEL_RULES`,
the one classifier of a profile's kernels). `region_of` maps the module that ran an op onto `REGIONS`.
"""

from __future__ import annotations

import re

CLASSES = (
    "gemm", "attention", "conv", "norm/elementwise", "codebook", "heads/CE", "optimizer/EMA", "other",
)  # fmt: skip
REGIONS = (
    "front-end convs", "projection", "pos-conv", "student layers", "student glue", "teacher", "heads",
    "codebooks", "glue (mask, targets, loss)", "optimizer", "teacher EMA",
)  # fmt: skip

GEMM_OPS = {"mm", "addmm", "bmm", "baddbmm", "_addmm_activation", "dot", "mv"}
VIEW_OPS = {
    "view", "_unsafe_view", "_reshape_alias", "reshape", "transpose", "t", "permute", "expand", "slice", "select",
    "unsqueeze", "squeeze", "as_strided", "alias", "detach", "split", "split_with_sizes", "unbind", "narrow",
    "diagonal", "view_as", "expand_as", "unfold", "lift_fresh", "empty", "empty_like", "empty_strided", "new_empty",
    "new_empty_strided", "resize_", "_local_scalar_dense", "is_same_size", "set_", "size", "stride", "dim",
}  # fmt: skip
REDUCTION_WORDS = ("norm", "sum", "mean", "var", "softmax", "amax", "amin", "max", "min", "argm", "cumsum", "prod")


def op_class(name: str) -> str:
    """Class of an aten / spidr_fast op (its overload packet name; custom ops as `spidr_fast::name`)."""
    if name.startswith("spidr_fast::"):
        op = name.split("::")[1]
        if op.startswith("pos_conv"):
            return "conv"  # the fused positional conv layer (its LayerNorm + GELU ride along)
        return (
            "heads/CE" if op.startswith("heads") else "codebook" if op.startswith("codebook") else "norm/elementwise"
        )
    if name in GEMM_OPS:
        return "gemm"
    if "attention" in name:
        return "attention"
    if name.startswith("convolution"):
        return "conv"
    if name.startswith(("_foreach", "_fused_adam", "_amp_")):
        return "optimizer/EMA"
    if name in ("sort", "searchsorted", "nonzero", "unique", "_unique2"):
        return "other"
    return "norm/elementwise"


# CUDA kernels by name, the one classifier of a profile's kernels: (profile class, roofline class, pattern),
# the first pattern found in the lower-cased name wins. The profile class is the finer one
# `bench/profile_step.py` reports per kernel; the roofline class (one of `CLASSES`) is what `classify` gives,
# to set measured times beside `predict`'s. cuDNN conv kernels (and its layout transposes around
# channels-first convs) come before GEMMs: their names say "implicit_gemm" too; attention before both
# (cuDNN SDPA, FlashAttention's "convert_dq"); inductor's Triton kernels are named after the aten ops they
# fuse ("triton_poi_fused_convolution_..." is pointwise glue, not a conv).
KERNEL_RULES: tuple[tuple[str, str, str], ...] = (
    ("communication", "other", r"nccl"),
    ("copy / cast / fill", "other", r"^memcpy|^memset|\[memcpy|\[memset"),
    ("fused: codebook", "codebook", r"_assign_kernel|_segment_sum_kernel|codebook"),
    ("fused: heads + CE", "heads/CE", r"_heads_ce_"),
    ("fused: conv LN+GELU", "norm/elementwise", r"_cln_gelu_"),
    ("fused: first conv block", "norm/elementwise", r"_wave_ln_gelu_"),  # kernels/conv0.py: memory-bound, as LN+GELU
    ("fused: pos-conv", "conv", r"_pos_conv"),
    ("attention", "attention", r"flash|fmha|attention|sdpa|attn"),
    ("inductor triton", "gemm", r"^triton_tem_fused_.*mm"),
    ("inductor triton", "optimizer/EMA", r"^triton_(for_|.*(adam|foreach))"),
    ("inductor triton", "norm/elementwise", r"^triton_|^triton\."),
    ("optimizer", "optimizer/EMA", r"multi_tensor_apply|adam|foreach|amp_update_scale|amp_non_finite"),
    ("convolution", "conv", r"conv(?!ert)|fprop|dgrad|wgrad|winograd|nchwtonhwc|nhwctonchw|cudnn|im2col|col2im"),
    ("GEMM", "gemm", r"gemm|gemv|cublas|cutlass|nvjet|s16816|splitk|xmma|\bmm\b|matmul|addmm|bmm"),
    ("normalisation", "norm/elementwise", r"layer_norm|layernorm|group_norm|groupnorm|batch_norm|rms_norm"),
    ("softmax / loss", "norm/elementwise", r"softmax|nll_loss|cross_entropy"),
    ("copy / cast / fill", "norm/elementwise", r"copy|cast|fill|cat_|catarray|index|gather|scatter|nonzero"),
    ("reduction", "norm/elementwise", r"reduce|sum|mean|norm|argmin|argmax|max|min"),
    ("elementwise", "norm/elementwise", r"elementwise|vectorized|unrolled|pointwise|gelu|dropout|mul|add|div|where"),
)


def kernel_classes(kernel_name: str) -> tuple[str, str]:
    """(profile class, roofline class) of a CUDA kernel as `torch.profiler` names it (`KERNEL_RULES`)."""
    k = kernel_name.lower()
    return next(((fine, cls) for fine, cls, pattern in KERNEL_RULES if re.search(pattern, k)), ("other", "other"))


def classify(kernel_name: str) -> str:
    """Class (one of `CLASSES`) of a CUDA kernel as `torch.profiler` names it."""
    return kernel_classes(kernel_name)[1]


# A compiled method's path and this prefix the labels of the ops it runs: "teacher._embed|teacher.layer_norm".
SCOPE = "|"


def region_of(label: str, phase: str) -> str:
    label = label.rpartition(SCOPE)[2]  # reported by module, whatever compiled method ran it
    if phase == "opt":
        return "optimizer"
    if phase == "ema":
        return "teacher EMA"
    first = label.split(".")[0]
    if first == "feature_extractor":
        return "front-end convs"
    if first in ("feature_projection", "projection_dropout"):
        return "projection"
    if first == "student":
        if "pos_conv" in label:
            return "pos-conv"
        return "student layers" if ".layers." in label else "student glue"
    if first == "teacher":
        return "teacher"
    if first == "heads":
        return "heads"
    if first == "codebooks":
        return "codebooks"
    return "glue (mask, targets, loss)"
