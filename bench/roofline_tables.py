"""The numbers the roofline predictor (bench/roofline.py) prices a step with, each with where it came from.

* the devices' dense peaks and instruction-issue rates (`device_peaks`, `DEVICES`), from spidr_fast/devices.py:
  the issue rate is SMs x 4 schedulers x boost clock x 32 lanes;
* every efficiency in ONE table, `EFFICIENCY`: assumptions until `make gpu-check` calibrates them;
* the instructions per element of each Triton kernel and elementwise op, from its sm_90 SASS
  (`ISSUE_INSTRUCTIONS`, bench/sass_per_element.py: rerun it and paste its rows here after changing a kernel),
  and the kernels (those rows) each op runs (`ISSUE_KERNELS`): an exact-erf GELU or a LayerNorm can take longer
  to issue than to move its bytes.
"""

from __future__ import annotations

from spidr_fast.devices import lookup as lookup_device


# Dense peaks: bf16 tensor-core and fp32 (no TF32) FLOP/s, HBM bytes/s, from spidr_fast/devices.py (its
# sources there). The default devices, by their short names (the SXM parts); `device_peaks` also takes any
# name that table knows ("H100 PCIe", "NVIDIA H100 PCIe", "GH200", ...).
def device_peaks(device: str) -> dict[str, float]:
    d = lookup_device(device)
    if d is None:
        raise ValueError(f"device {device!r}: one of {sorted(DEVICES)} or a device spidr_fast/devices.py knows")
    return {"bf16": d.bf16, "fp32": d.fp32, "hbm": d.hbm, "issue": d.issue_rate}


DEVICES = {alias: device_peaks(alias) for alias in ("A100", "H100", "H200")}
# (value, where it came from). Fractions of the peak that kernels of this kind reach at these shapes.
# None is measured on spidr_fast yet: `make gpu-check` writes measured per-class times beside the
# predicted ones; replace a value by the calibrated one and say which run it came from.
EFFICIENCY: dict[str, tuple[float, str]] = {
    "gemm": (0.70, "assumed: cuBLAS bf16 at M ~ 12k frames, N, K in 768..3072 (PERF-MODEL.md); uncalibrated"),
    "gemm_small": (0.45, "assumed: GEMMs under 2 GFLOP (heads, codebooks) do not fill the GPU; uncalibrated"),
    "gemm_fp32": (0.70, "assumed: fp32 FFMA GEMMs (codebook distances, 'ieee'); uncalibrated"),
    "conv": (0.50, "assumed: cuDNN implicit GEMM, k 2-10, stride 2-5, 512 ch (PERF-MODEL.md); uncalibrated"),
    "conv_grouped": (0.15, "assumed: the grouped pos-conv, 48 ch/group, k=19 (PERF-MODEL.md); uncalibrated"),
    "conv_pos_triton": (0.25, "assumed: Triton pos-conv, tl.dot per tap, 48/64 padded ch (56% of MMA); uncalibrated"),
    "attention": (0.40, "assumed: FA2-class flash SDPA with dropout, head dim 64 (PERF-MODEL.md); uncalibrated"),
    "attention_cudnn": (
        0.55,
        "assumed: cuDNN SDPA, Hopper, dropout, Dh 64 (PyTorch 2.5 notes: up to 1.75x FA2); "
        "spidr_fast's dense default on sm_90 (kernels/attention.py DENSE_ORDER); uncalibrated",
    ),
    "attention_bias": (0.22, "assumed: memory-efficient SDPA with a bias (a mask passed); uncalibrated"),
    "memory": (0.80, "assumed: elementwise/reduction kernels reach 80% of HBM bandwidth (PERF-MODEL.md)"),
    "kernel_min_s": (2.5e-6, "assumed: shortest kernel on the GPU, launch overhead hidden (PERF-MODEL.md)"),
    "issue": (
        1.0,
        "peak: one warp-instruction per scheduler per clock at the boost clock (an upper bound on "
        "the issue rate, stalls not counted); uncalibrated",
    ),
}

# Thread-instructions executed per element of the op's largest tensor (see `issue_instructions`, roofline_model.py),
# counted in the sm_90 SASS of the project's Triton kernels at the base shapes and of Triton stand-ins for the
# Inductor/eager ops (erf GELU, LayerNorm, dropout's Philox, ...), compiled offline: bench/sass_per_element.py (its
# docstring says how loops and elements are counted). A kernel's time is at least its instructions / the device's
# issue rate.
ISSUE_SOURCE = "sm_90 SASS, triton 3.9.0, commit 1dede74: `.venv/bin/python bench/sass_per_element.py`"
ISSUE_INSTRUCTIONS: dict[str, float] = {
    "_cln_gelu_fwd_kernel": 41.0,
    "_cln_gelu_bwd_kernel": 55.7,
    "_wave_ln_gelu_fwd_kernel": 40.0,
    "_wave_ln_gelu_bwd_kernel": 81.2,
    "_pos_conv_kernel": 150.6,
    "_pos_conv_kernel dx": 108.4,
    "_pos_conv_ln_gelu_bwd_kernel": 50.7,
    "_pos_conv_dw_kernel": 172.2,
    "_assign_kernel": 307.6,
    "_segment_sum_kernel": 7.3,
    "_heads_ce_fwd_kernel": 19.6,
    "_heads_ce_bwd_kernel": 36.7,
    "copy": 4.0,
    "_to_copy": 5.0,
    "add": 7.0,
    "mul": 7.0,
    "gelu": 38.0,
    "gelu_backward": 49.0,
    "native_dropout": 70.0,
    "native_dropout_backward": 12.0,
    "native_layer_norm": 48.0,
    "native_layer_norm_backward dx": 56.0,
    "native_layer_norm_backward dw": 15.8,
    "sum": 24.0,
}
# The kernels (ISSUE_INSTRUCTIONS rows) an op runs, each over every element of the op's largest tensor. Other
# norm/elementwise ops: "copy" for copies and fills, "sum" for reductions, else "add" (a binary pointwise op).
# GEMM, conv, attention (cuBLAS, cuDNN, flash: their efficiencies carry it) and the multi-tensor optimizer/EMA
# kernels (memory-bound) have no issue term.
ISSUE_KERNELS: dict[str, tuple[str, ...]] = {
    "spidr_fast::channel_layer_norm_gelu": ("_cln_gelu_fwd_kernel",),
    "spidr_fast::channel_layer_norm_gelu_backward": ("_cln_gelu_bwd_kernel",),
    "spidr_fast::conv0_layer_norm_gelu": ("_wave_ln_gelu_fwd_kernel",),
    "spidr_fast::conv0_layer_norm_gelu_backward": ("_wave_ln_gelu_bwd_kernel",),
    "spidr_fast::pos_conv": ("_pos_conv_kernel",),
    "spidr_fast::pos_conv_backward": ("_pos_conv_ln_gelu_bwd_kernel", "_pos_conv_dw_kernel", "_pos_conv_kernel dx"),
    "spidr_fast::codebook_assign": ("_assign_kernel",),
    "spidr_fast::codebook_accumulate": ("_segment_sum_kernel",),
    "spidr_fast::codebook_assign_accumulate": ("_assign_kernel", "_segment_sum_kernel"),
    "spidr_fast::heads_ce": ("_heads_ce_fwd_kernel",),
    "spidr_fast::heads_ce_backward": ("_heads_ce_bwd_kernel",),
    "native_layer_norm_backward": ("native_layer_norm_backward dx", "native_layer_norm_backward dw"),
    "clone": ("copy",), "copy_": ("copy",), "contiguous": ("copy",), "stack": ("copy",), "cat": ("copy",),
    "zeros": ("copy",), "new_zeros": ("copy",), "zero_": ("copy",), "fill_": ("copy",), "full": ("copy",),
    "full_like": ("copy",), "ones_like": ("copy",), "zeros_like": ("copy",), "gather": ("copy",),
    "scatter_add": ("copy",), "scatter_": ("copy",), "index_select": ("copy",),
}  # fmt: skip
