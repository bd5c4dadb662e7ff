# ruff: noqa: E501  (real kernel names are long)
"""One classifier of profiled kernel names (`KERNEL_RULES` in bench/roofline_classes.py): `roofline.classify` (the
predictor's classes, beside which `make gpu-check` sets measured times) and `profile_step.kernel_class`
(the profile's finer classes) both read it. Names as torch.profiler reports them on H100/A100."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import profile_step  # noqa: E402
import roofline  # noqa: E402

# name -> (profile class, roofline class)
KERNELS = {
    # cuBLAS / cuBLASLt / CUTLASS GEMMs
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_cublas": ("GEMM", "gemm"),
    "nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNN": ("GEMM", "gemm"),
    "ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_64x3_tn": ("GEMM", "gemm"),
    "void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_32x6_tn_align8>": ("GEMM", "gemm"),
    "void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float, __nv_bfloat16, true, false>": ("GEMM", "gemm"),
    "void gemv2T_kernel_val<int, int, float, float, float, float, 128, 16, 4, 4, false, false>": ("GEMM", "gemm"),
    # cuDNN convolutions and their layout transposes
    "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_g1_execute_kernel__5x_cudnn": ("convolution", "conv"),
    "sm80_xmma_wgrad_implicit_gemm_indexed_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x32_stage4": ("convolution", "conv"),
    "sm80_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize64x64x64_stage4": ("convolution", "conv"),
    "void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16, float, false, true>": ("convolution", "conv"),
    "void cudnn::engines_precompiled::nhwcToNchwKernel<__nv_bfloat16, __nv_bfloat16, float, true, false>": ("convolution", "conv"),
    "void cudnn::cnn::wgrad2d_grouped_direct_kernel<float, __nv_bfloat16>": ("convolution", "conv"),
    "ampere_scudnn_128x64_relu_interior_nn_v1": ("convolution", "conv"),
    "void implicit_convolve_sgemm<float, float, 128, 5, 5, 3, 3, 3, 1, false, false, true>": ("convolution", "conv"),
    # attention: FlashAttention 2/3, memory-efficient, cuDNN SDPA
    "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4, false, false, cutlass::bfloat16_t>>": ("attention", "attention"),
    "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<64, 128, 128, 8>>": ("attention", "attention"),
    "void flash::flash_bwd_convert_dq_kernel<Flash_bwd_kernel_traits<64, 128>>": ("attention", "attention"),
    "void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90<cutlass::bfloat16_t>>>": ("attention", "attention"),
    "fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::bfloat16_t>::Params)": ("attention", "attention"),
    "fmha_cutlassB_bf16_aligned_64x64_k64_sm80(PyTorchMemEffAttention::AttentionBackwardKernel::Params)": ("attention", "attention"),
    "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1_kernel0_0": ("attention", "attention"),
    # inductor's Triton kernels: named after the aten ops they fuse
    "triton_poi_fused__to_copy_add_native_dropout_0": ("inductor triton", "norm/elementwise"),
    "triton_red_fused_native_layer_norm_native_layer_norm_backward_3": ("inductor triton", "norm/elementwise"),
    "triton_per_fused__to_copy_convolution_gelu_native_group_norm_2": ("inductor triton", "norm/elementwise"),
    "triton_tem_fused_addmm_7": ("inductor triton", "gemm"),
    # the project's Triton kernels
    "_assign_kernel": ("fused: codebook", "codebook"),
    "_segment_sum_kernel": ("fused: codebook", "codebook"),
    "_heads_ce_fwd_kernel": ("fused: heads + CE", "heads/CE"),
    "_heads_ce_bwd_kernel": ("fused: heads + CE", "heads/CE"),
    "_cln_gelu_fwd_kernel": ("fused: conv LN+GELU", "norm/elementwise"),
    "_cln_gelu_bwd_kernel": ("fused: conv LN+GELU", "norm/elementwise"),
    # eager ATen kernels
    "void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl(at::TensorIteratorBase&)>": ("elementwise", "norm/elementwise"),
    "void at::native::vectorized_elementwise_kernel<4, at::native::bfloat16_copy_kernel_cuda(at::TensorIteratorBase&)>": ("copy / cast / fill", "norm/elementwise"),
    "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)>": ("copy / cast / fill", "norm/elementwise"),
    "void at::native::(anonymous namespace)::fused_dropout_kernel_vec<c10::BFloat16, float, unsigned int, 1, 4, bool>": ("elementwise", "norm/elementwise"),
    "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float>": ("normalisation", "norm/elementwise"),
    "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float>": ("softmax / loss", "norm/elementwise"),
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::func_wrapper_t<float>>>": ("reduction", "norm/elementwise"),
    "void at::native::(anonymous namespace)::CatArrayBatchedCopy<at::native::(anonymous namespace)::OpaqueType<2>>": ("copy / cast / fill", "norm/elementwise"),
    "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<TensorListMetadata<4>, FusedAdamMathFunctor<float, 4>>": ("optimizer", "optimizer/EMA"),
    # copies and communication
    "Memcpy HtoD (Pageable -> Device)": ("copy / cast / fill", "other"),
    "Memset (Device)": ("copy / cast / fill", "other"),
    "ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)": ("communication", "other"),
    "ncclDevKernel_ReduceScatter_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)": ("communication", "other"),
    "ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)": ("communication", "other"),
    "some_unknown_kernel_name": ("other", "other"),
}  # fmt: skip


@pytest.mark.parametrize(("name", "classes"), KERNELS.items(), ids=[n[:60] for n in KERNELS])
def test_one_classifier_serves_the_profile_and_the_predictor(name: str, classes: tuple[str, str]) -> None:
    assert roofline.kernel_classes(name) == classes
    assert (profile_step.kernel_class(name), roofline.classify(name)) == classes
    assert roofline.classify(name) in roofline.CLASSES


def project_kernels() -> list[str]:
    """Every Triton kernel the project launches (a module's `KERNELS`, the `_kernel` entries)."""
    names = []
    for path in sorted((ROOT / "kernels").glob("*.py")):
        module = importlib.import_module(f"spidr_fast.kernels.{path.stem}")
        names += [n for n in getattr(module, "KERNELS", ()) if n.endswith("_kernel")]
    return names


def test_every_project_kernel_has_a_fused_class() -> None:
    names = project_kernels()
    assert len(names) >= 6
    for name in names:
        fine, cls = roofline.kernel_classes(name)
        assert fine.startswith("fused: ") and cls != "other", name
