"""bench/roofline.py: the meta-device trace counts FLOPs as torch's counter does where torch is right, and as
the hand formulas say where it is not (grouped-conv weight gradients, attention); the CLI's compare runs."""

from __future__ import annotations

import collections
import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from spidr_fast import SpidR
from spidr_fast.train.flops import step_flop_counter

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
import roofline
import roofline_trace


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8, bias=False))


def test_gemm_flops_equal_torch_flop_counter() -> None:
    model, x = _mlp(), torch.randn(5, 16)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x).sum().backward()
    meta_model = copy.deepcopy(model).to("meta")
    ops = roofline.trace_fn(lambda: meta_model(torch.empty(5, 16, device="meta")).sum().backward(), meta_model)
    assert sum(op.flops for op in ops) == counter.get_total_flops() > 0
    assert {op.cls for op in ops if op.flops} == {"gemm"}
    assert {op.label for op in ops if op.name == "addmm"} == {"0"}  # the module that ran it


def test_grouped_conv_weight_gradient_counted_once() -> None:
    b, c, k, g, t = 2, 32, 5, 4, 20
    conv = nn.Conv1d(c, c, k, groups=g, bias=False, device="meta")
    x = torch.empty(b, c, t, device="meta", requires_grad=True)
    ops = roofline.trace_fn(lambda: conv(x).sum().backward(), conv)
    one_pass = 2 * b * c * (c // g) * k * (t - k + 1)  # 81,920: each output takes C/G * K multiply-adds
    by_name = {op.name: op for op in ops}
    assert by_name["convolution"].flops == one_pass
    assert by_name["convolution_backward"].flops == 2 * one_pass  # grad_input + grad_weight, not 1 + groups
    assert by_name["convolution_backward"].groups == g and by_name["convolution_backward"].kernels == 2


def test_attention_takes_the_flash_path_and_is_counted() -> None:
    b, h, t, d = 2, 4, 16, 8
    q, k, v = (torch.empty(b, h, t, d, device="meta", requires_grad=True) for _ in range(3))
    fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.1).sum().backward()
    ops = roofline.trace_fn(fn, autocast=True)
    pair = 2 * b * h * t * t * d  # one (t, d) x (d, t) product per head
    attn = {op.name: op for op in ops if op.cls == "attention"}
    assert attn["_scaled_dot_product_flash_attention"].flops == 2 * pair
    assert attn["_scaled_dot_product_flash_attention"].low_precision  # bf16 under autocast
    assert attn["_scaled_dot_product_flash_attention_backward"].flops == 5 * pair  # QK^T recomputed


def test_tiny_step_gemm_and_conv_flops_equal_a_real_cpu_step() -> None:
    cfg = roofline.load_config("tiny")
    tr = roofline.trace("spidr_fast", cfg, batch=2, seconds=1.0)
    meta = collections.Counter()
    fused = {"spidr_fast::pos_conv": "convolution", "spidr_fast::pos_conv_backward": "convolution_backward"}
    fused |= {f"spidr_fast::conv0_layer_norm_gelu{s}": f"convolution{s}" for s in ("", "_backward")}  # first block
    for op in tr.ops:
        if op.phase in ("fwd", "bwd"):
            meta[fused.get(op.name, op.name)] += op.flops  # the CPU step runs the fused ops' reference convs
    torch.manual_seed(0)
    model = SpidR(cfg).train()
    frames = roofline_trace._frames(cfg, 16000)
    counter = step_flop_counter()
    with counter:
        losses, _ = model(torch.randn(2, 16000), mask_indices=torch.zeros(2, int(0.526 * frames), dtype=torch.long))
        losses.sum().backward()
    cpu = {str(k).removeprefix("aten."): v for k, v in counter.flop_counts["Global"].items()}
    for name in ("mm", "addmm", "convolution", "convolution_backward"):
        assert meta[name] == cpu[name] > 0, name
    assert tr.model_flops > sum(cpu[n] for n in ("mm", "addmm", "convolution", "convolution_backward"))


def test_compare_writes_json_and_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "r.json"
    roofline.main(["--compare", "spidr_fast", "reference", "--config", "tiny", "--batch", "2", "--seconds", "1",
                   "--device", "H100", "--device", "A100", "--json", str(out)])  # fmt: skip
    text = capsys.readouterr().out
    assert "| spidr_fast | H100 |" in text and "| reference | A100 |" in text
    data = json.loads(out.read_text())
    assert set(data["variants"]) == {"spidr_fast", "spidr_fast:frozen", "reference", "reference:frozen"}
    for name in ("spidr_fast", "reference"):
        h100 = data["variants"][name]["H100"]
        assert set(h100["classes"]) <= set(roofline.CLASSES)
        assert h100["ms"] == pytest.approx(sum(r["ms"] for r in h100["classes"].values()))
        assert 0 < h100["mfu_run_avg"] < 1
        a100 = data["variants"][name]["A100"]
        assert a100["gflop"] == h100["gflop"] and a100["ms"] >= h100["ms"]  # same work, slower device (tiny:
        # every kernel at the minimum time)


def test_predict_and_classify_share_the_classes() -> None:
    pred = roofline.predict("tiny", "H200", batch=1, seconds=1.0)
    assert set(pred) == set(roofline.CLASSES) and pred["gemm"] > 0 and pred["conv"] > 0
    names = {
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "gemm",
        "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN": "gemm",
        "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc": "conv",
        "void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16>": "conv",
        "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>": "attention",
        "triton_poi_fused_add_native_dropout_0": "norm/elementwise",
        "_heads_ce_bwd_kernel": "heads/CE",
        "_pos_conv_ln_gelu_bwd_kernel": "conv",  # the fused pos-conv op is priced as one conv
        "_assign_kernel": "codebook",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>": "optimizer/EMA",
        "Memcpy HtoD (Pageable -> Device)": "other",
        "void cudnn::cnn::wgrad2d_grouped_direct_kernel<float, __nv_bfloat16>": "conv",
        "void at::native::vectorized_elementwise_kernel<4, at::native::bfloat16_copy_kernel_cuda>": "norm/elementwise",
        "void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_32x6_tn_align8>": "gemm",
        "void flash::flash_bwd_convert_dq_kernel<Flash_bwd_kernel_traits<64, 128>>": "attention",
    }
    assert {n: roofline.classify(n) for n in names} == names
    with pytest.raises(ValueError, match="variant 'spidr_fast:fast'"):
        roofline.Variant.parse("spidr_fast:fast")


def test_channels_last_front_end_has_no_layout_transposes() -> None:
    """Under the `ncw` what-if (cuDNN transposes channels-first bf16 convs), the channels-last front-end's
    convs need none (block 0 reads 1 channel); SPIDR_FAST_REFERENCE_OPS=frontend_layout brings them back."""

    def conv_transposes(variant: str) -> int:
        tr = roofline.trace(variant, "tiny", batch=2, seconds=1.0)
        return sum(op.extra for op in tr.ops if op.cls == "conv" and op.region == "front-end convs")

    assert conv_transposes("spidr_fast:ncw") == 0
    assert conv_transposes("spidr_fast:ncw:ref_ops=frontend_layout") > 0


def test_dense_attention_priced_as_the_backend_the_device_table_picks() -> None:
    """spidr_fast's unmasked attention is priced as the dense backend kernels/attention.py picks on the device
    (cuDNN SDPA on Hopper), PyTorch's flash SDPA where it picks that or where "attention" is on its reference."""
    ops = roofline.trace_fn(lambda: torch.nn.functional.scaled_dot_product_attention(*qkv_meta(), dropout_p=0.1))
    assert [op.name for op in ops] == ["_scaled_dot_product_flash_attention"]
    ops[0].flops = 10**12  # compute-bound

    def ms(device: str, dense: bool) -> float:
        trace = roofline.Trace(ops, [], 1.0, None, ops[0].flops, dense)
        return roofline.summarize(trace, device)["classes"]["attention"]["ms"]

    assert roofline.dense_attention_key("H100") == roofline.dense_attention_key("H200") == "attention_cudnn"
    assert roofline.dense_attention_key("A100") == "attention"
    eff = {key: roofline.EFFICIENCY[key][0] for key in ("attention", "attention_cudnn")}
    assert ms("H100", True) == pytest.approx(ms("H100", False) * eff["attention"] / eff["attention_cudnn"])
    assert ms("A100", True) == ms("A100", False)
    step = roofline.trace("spidr_fast", "tiny", 1, 1.0)
    assert step.dense_attention and not roofline.trace("spidr_fast:ref_ops=attention", "tiny", 1, 1.0).dense_attention
    assert not roofline.trace("reference", "tiny", 1, 1.0).dense_attention


def qkv_meta(b: int = 2, h: int = 4, t: int = 16, d: int = 8) -> list[torch.Tensor]:
    return [torch.empty(b, h, t, d, device="meta", dtype=torch.bfloat16) for _ in range(3)]


def test_levers_table_switches_each_built_lever() -> None:
    rows = [r for r in roofline.levers_table("tiny", batch=1, seconds=1.0).splitlines() if r.startswith("| ")][1:]
    assert len(rows) == 2 * (1 + len(roofline.LEVERS))
    n = 1 + len(roofline.LEVERS)
    assert [r.split(" | ")[1] for r in rows] == ["no"] * n + ["yes"] * n
    assert {r.split(" | ")[0] for r in rows} == {"| all built levers off", *(f"| + {t}" for t, _ in roofline.LEVERS)}


def test_whole_model_compile_and_efficiency_what_ifs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in roofline.EFFICIENCY.items():  # --eff edits the table (roofline_tables.py's) in place
        monkeypatch.setitem(roofline.EFFICIENCY, key, value)
    out = tmp_path / "r.json"
    roofline.main(["--compare", "spidr_fast", "spidr_fast:whole", "--config", "tiny", "--batch", "1", "--seconds",
                   "1", "--device", "H100", "--eff", "conv_grouped=0.3", "--json", str(out)])  # fmt: skip
    data = json.loads(out.read_text())
    assert data["efficiency"]["conv_grouped"][0] == 0.3 and "what-if" in data["efficiency"]["conv_grouped"][1]
    per_layer, whole = (data["variants"][v]["H100"] for v in ("spidr_fast", "spidr_fast:whole"))
    assert whole["gflop"] == per_layer["gflop"] and whole["gb"] < per_layer["gb"]  # more fused, less traffic
    with pytest.raises(SystemExit, match="--eff 'gemmm=1'"):
        roofline.main(["--config", "tiny", "--eff", "gemmm=1"])


def test_fusion_regions_are_the_trainers_compiled_regions() -> None:
    """spidr_fast is priced with the regions its trainer compiles (parallelize.COMPILED_REGIONS): every one of
    them and nothing else fuses; `:layers` (run.compile_glue=false) fuses the layers only, and moves more."""
    from spidr_fast.train.parallelize import region_paths

    paths = {path for path, _, _ in region_paths(SpidR(roofline.load_config("tiny")))}
    glue, layers = (roofline.trace(v, "tiny", batch=1, seconds=1.0) for v in ("spidr_fast", "spidr_fast:layers"))
    assert {glue.compiled(op) for op in glue.ops} - {None} == paths
    assert {layers.compiled(op) for op in layers.ops} - {None} == {p for p in paths if ".layers." in p}
    assert {op.phase for op in glue.ops if glue.compiled(op)} == {"fwd", "bwd"}
    # what each compiled method ran is labelled with its path; the report still groups it by module
    assert {op.label for op in glue.ops if glue.compiled(op) == "_targets"} == {"_targets|"}
    assert any(op.label == "teacher._embed|teacher.pos_conv_embed" for op in glue.ops)
    assert roofline.region_of("teacher._embed|teacher.pos_conv_embed", "fwd") == "teacher"
    assert roofline.region_of("student._embed_norm|student.layer_norm", "bwd") == "student glue"
    by_glue, by_layers = (roofline.summarize(tr, "H100") for tr in (glue, layers))
    assert by_glue["gflop"] == by_layers["gflop"] and by_glue["gb"] < by_layers["gb"]


def test_fused_first_conv_block() -> None:
    """The first conv block as one op (kernels/conv0.py): the conv's FLOPs, in the class its kernels classify as,
    moving the waveform and y once each way instead of the conv output four times (SPIDR_FAST_REFERENCE_OPS=conv0:
    the conv + LayerNorm/GELU ops again)."""
    from spidr_fast.kernels import conv0

    def first_block(variant: str) -> list:
        tr = roofline.trace(variant, "tiny", batch=2, seconds=1.0)
        block = [op for op in tr.ops if op.label.startswith("feature_extractor.conv_layers.0")]
        return [op for op in block if op.name.startswith(("spidr_fast::", "convolution"))]  # not the grad accumulation

    fused, unfused = first_block("spidr_fast"), first_block("spidr_fast:ref_ops=conv0")
    assert [op.name for op in fused] == [
        "spidr_fast::conv0_layer_norm_gelu",
        "spidr_fast::conv0_layer_norm_gelu_backward",
    ]
    assert {op.name for op in unfused} >= {"convolution", "convolution_backward"}
    conv_flops = {op.phase: op.flops for op in unfused if op.name.startswith("convolution")}
    assert {op.phase: op.flops for op in fused} == conv_flops and conv_flops["fwd"] > 0
    assert sum(op.bytes for op in fused) < 0.5 * sum(op.bytes for op in unfused)
    for kernel in [k for k in conv0.KERNELS if k.endswith("_kernel")]:  # the launched ones, as a profile names them
        assert roofline.classify(kernel) == fused[0].cls == fused[1].cls == "norm/elementwise"
