"""`make gpu-check`'s harness (bench/gpu_check.py) on a machine without CUDA: every GPU step is skipped with
its reason and the report is still written; `--smoke` runs the stage scripts on the CPU. Never a timing check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

import gpu_check  # noqa: E402
import gpu_report  # noqa: E402
from profile_step import kernel_class  # noqa: E402

from spidr_fast.kernels import attention as attn  # noqa: E402

RECORD = {
    "device": "NVIDIA H100 80GB HBM3",
    "config": "base",
    "commit": "abc",
    "step_time_s": 1.0,
    "frames_per_s": 1.0,
}
NO_CUDA = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def gpu_check_run(out: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(BENCH / "gpu_check.py"), "--out", str(out), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=NO_CUDA, cwd=ROOT, timeout=600)


def stages(out: Path) -> dict[str, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "stages.jsonl").read_text().splitlines())}


def test_without_cuda_every_gpu_step_is_skipped_and_the_report_is_written(tmp_path: Path) -> None:
    run = gpu_check_run(tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    steps = stages(tmp_path)
    assert list(steps) == [s.name for s in gpu_check.STEPS]
    assert steps["env"]["status"] == "ok"
    for name, record in steps.items():
        if name != "env":
            assert record["status"] == "skipped" and record["reason"].startswith("no CUDA device"), record
    env = json.loads((tmp_path / "env.json").read_text())
    assert env["cuda_available"] is False and env["torch"]
    report = (tmp_path / "REPORT.md").read_text()
    for section in ("## Steps", "## Targets", "## 1. Environment", "## 2. Tests", "## 3. Kernel", "## 4. Training"):
        assert section in report
    assert "## 5. Extraction" in report and "no CUDA device" in report


def test_makefile_target_passes_out_and_python() -> None:
    make = subprocess.run(
        ["make", "-n", "gpu-check", "OUT=/tmp/somewhere", "PYTHON=python3"], capture_output=True, text=True, cwd=ROOT
    )
    assert make.returncode == 0, make.stderr
    assert "python3 bench/gpu_check.py --out /tmp/somewhere" in make.stdout


def test_reference_path_is_measured_and_named(tmp_path: Path) -> None:
    checkout = tmp_path / "spidr-src"
    (checkout / "src" / "spidr").mkdir(parents=True)
    (checkout / "src" / "spidr" / "__init__.py").write_text('__version__ = "9.9.9-checkout"\n')
    out = tmp_path / "out"
    run = gpu_check_run(out, "--reference-path", str(checkout))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ref = json.loads((out / "env.json").read_text())["reference"]
    assert ref["source"] == "checkout" and ref["version"] == "9.9.9-checkout"
    assert ref["path"] == str(checkout / "src" / "spidr")
    assert "checkout 9.9.9-checkout" in (out / "REPORT.md").read_text()
    bad = gpu_check_run(tmp_path / "bad", "--reference-path", str(tmp_path / "nowhere"))
    assert bad.returncode != 0 and "--reference-path" in bad.stderr and "no spidr package" in bad.stderr


def test_smoke_runs_the_stage_scripts_on_cpu(tmp_path: Path) -> None:
    pytest.importorskip("spidr", reason="the ablation's last row runs the reference package")
    run = gpu_check_run(tmp_path, "--smoke", "--only", "train-profile", "train-roofline", "attention")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    steps = stages(tmp_path)
    assert {steps[s]["status"] for s in ("train-profile", "train-roofline", "attention")} == {"ok"}
    profile = json.loads((tmp_path / "profile.json").read_text())
    assert profile["by_class"] and abs(sum(r["share"] for r in profile["by_class"]) - 1) < 1e-6
    assert profile["batches"] and sum(b["steps"] for b in profile["batches"]) == profile["steps"]
    assert profile["by_model_class"]["gemm"] > 0  # CPU ops classed as the predictor classes them
    assert sum(profile["by_model_class"].values()) == pytest.approx(profile["total_ms_per_step"])
    cmp = json.loads((tmp_path / "roofline.json").read_text())
    assert cmp["roofline_device"] == "H100" and "not in spidr_fast/devices.py" in cmp["note"]
    assert all(r["predicted_ms"] >= 0 for r in cmp["by_class"]) and cmp["total"]["predicted_ms"] > 0
    attention = [json.loads(line) for line in (tmp_path / "attention.jsonl").read_text().splitlines()]
    by_backend = {r["backend"]: r for r in attention if r["benchmark"] == "attention_backend"}
    assert by_backend["masked"]["status"] == "ok" and by_backend["masked"]["grad_rel_err"] < 1e-5
    assert all(r["status"] == "skipped" and r["reason"] for b, r in by_backend.items() if b != "masked")
    dense = {(r["mode"], r["backend"]): r for r in attention if r["benchmark"] == "attention_dense"}
    assert {mode for mode, _ in dense} == {"train", "fwd+bwd", "fwd"}  # every backend in every mode
    assert {backend for _, backend in dense} == set(attn.DENSE_BACKENDS)
    ran = {key for key, r in dense.items() if r["status"] == "ok"}  # on CPU: SDPA, and its flash kernel
    assert ran == {
        ("train", "sdpa"),
        ("fwd+bwd", "sdpa"),
        ("fwd+bwd", "sdpa_flash"),
        ("fwd", "sdpa"),
        ("fwd", "sdpa_flash"),
    }
    assert all(dense[key]["out_rel_err"] < 1e-5 for key in ran) and dense["train", "sdpa"]["grad_rel_err"] < 1e-5
    assert all(r["status"] == "skipped" and r["reason"] for key, r in dense.items() if key not in ran)
    choices = [r for r in attention if r["benchmark"] == "attention_dense_choice"]
    assert [r["mode"] for r in choices] == ["train", "fwd+bwd", "fwd"] and {r["default"] for r in choices} == {"sdpa"}
    report = (tmp_path / "REPORT.md").read_text()
    assert "--smoke run" in report and "| masked | float32 | ok |" in report and "per kernel class" in report
    assert "| train (default) | sdpa | ok |" in report and "- fwd (dropout 0): fastest" in report
    assert "Predicted (bench/roofline.py) beside measured" in report and "**Note:**" in report


def test_predicted_beside_measured_from_a_synthetic_profile(tmp_path: Path) -> None:
    import profile_roofline
    import roofline

    batches = [{"size": 2, "samples": 16_000, "steps": 3}, {"size": 1, "samples": 24_000, "steps": 1}]
    measured = dict.fromkeys(roofline.CLASSES, 0.0) | {"gemm": 3.0, "conv": 0.5, "norm/elementwise": 1.25}
    profile = {"device": "NVIDIA H200", "config": "tiny", "compiled": False, "timeline": "device kernels",
               "batches": batches, "by_model_class": measured}  # fmt: skip
    cmp = profile_roofline.side_by_side(profile)
    assert cmp["roofline_device"] == "H200" and cmp["note"] is None and cmp["variant"] == "spidr_fast:eager"
    cfg = profile_roofline._config(profile_roofline.PRESETS["tiny"][0])
    one = roofline.predict(cfg, "H200", "spidr_fast:eager", 2, 1.0)
    two = roofline.predict(cfg, "H200", "spidr_fast:eager", 1, 1.5)
    rows = {r["class"]: r for r in cmp["by_class"]}
    assert set(rows) == set(roofline.CLASSES)
    for cls in roofline.CLASSES:  # the profiled steps' shapes, weighted by their steps
        assert rows[cls]["predicted_ms"] == pytest.approx((3 * one[cls] + two[cls]) / 4)
        assert rows[cls]["measured_ms"] == measured[cls]
    assert rows["gemm"]["ratio"] == pytest.approx(3.0 / rows["gemm"]["predicted_ms"])
    assert cmp["total"]["measured_ms"] == pytest.approx(4.75)
    assert profile_roofline.roofline_device("NVIDIA H100 PCIe") == ("H100 PCIe", None)
    assert profile_roofline.roofline_device("NVIDIA RTX A6000")[0] == profile_roofline.DEFAULT_DEVICE
    assert "RTX A6000" in profile_roofline.roofline_device("NVIDIA RTX A6000")[1]

    (tmp_path / "roofline.json").write_text(json.dumps(cmp))
    report = gpu_report.write_report(tmp_path).read_text()
    g = rows["gemm"]
    assert f"| gemm | {g['predicted_ms']:.2f} | 3.00 | {3.0 / g['predicted_ms']:.2f} |" in report
    assert "Predicted for H200 (spidr_fast:eager, tiny config, the profiled batches: 2 x 1.0 s (3 steps)" in report
    assert "**Note:**" not in report


@pytest.mark.parametrize("smoke", [False, True])
def test_attention_is_timed_once(smoke: bool) -> None:
    """The kernels step's microbenchmark selection leaves attention out: the attention step times every backend
    (bench/attention_backends.py, with its errors against fp32), and only it."""
    ctx = gpu_check.Context(out=ROOT, python=sys.executable, smoke=smoke, env={}, child_env={})
    cmd = gpu_check._kernels(ctx)
    selection = cmd[cmd.index("-k") : cmd.index("-k") + 2] + (["-m", "gpu"] if "gpu" in cmd else [])
    args = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "bench", *selection]
    run = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=NO_CUDA)
    collected = [line for line in run.stdout.splitlines() if "::" in line]
    assert collected and not [t for t in collected if "attention" in t], run.stdout[-2000:]
    assert "attention" in {s.name for s in gpu_check.STEPS}


def test_a_step_past_its_limit_is_stopped_and_reported(tmp_path: Path) -> None:
    log = tmp_path / "step.log"
    status, _, reason = gpu_check.run_step(
        [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"], log, 2, dict(os.environ)
    )
    assert status == "timeout" and "2 s limit" in reason and "started" in log.read_text()
    status, rc, reason = gpu_check.run_step([sys.executable, "-c", "raise SystemExit('bad thing')"], log, 30, {})
    assert (status, rc) == ("failed", 1) and "bad thing" in reason


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("_assign_kernel", "fused: codebook"),
        ("_heads_ce_bwd_kernel", "fused: heads + CE"),
        ("_cln_gelu_fwd_kernel", "fused: conv LN+GELU"),
        ("_pos_conv_ln_gelu_bwd_kernel", "fused: pos-conv"),
        ("flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", "attention"),
        ("triton_per_fused_native_layer_norm_0", "inductor triton"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "GEMM"),
        ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT", "GEMM"),
        ("void cudnn::engines_precompiled::implicit_convolve_sgemm", "convolution"),
        ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel", "optimizer"),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", "elementwise"),
        ("Memcpy DtoD (Device -> Device)", "copy / cast / fill"),
    ],
)
def test_profile_kernel_classes(name: str, cls: str) -> None:
    assert kernel_class(name) == cls


def test_report_reads_junit_and_benchmarks(tmp_path: Path) -> None:
    (tmp_path / "junit_kernels.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1" time="2.5">'
        '<testcase classname="tests.kernels.test_x" name="test_a"/>'
        '<testcase classname="tests.kernels.test_x" name="test_b"><failure message="assert 1 == 2">tb</failure>'
        "</testcase></testsuite></testsuites>"
    )
    group = "codebook assign+accumulate C=8 N=6000 K=256 D=768 cuda"
    bench = [
        {"group": group, "name": f"test_codebook_gpu[{p}-step]", "params": {"provider": p}, "stats": {"median": t},
         "extra_info": {"device": "NVIDIA H100 80GB HBM3", "GB/s": 100.0, "TFLOP/s": 10.0}}
        for p, t in (("spidr_loop", 6e-3), ("ref", 3e-3), ("triton", 1e-3))
    ]  # fmt: skip
    (tmp_path / "kernels.json").write_text(json.dumps({"benchmarks": bench}))
    resources = {
        "ceilings": {"bf16_gemm_tflops": 790.0, "copy_gbs": 4300.0},
        "launched": [{"kernel": "codebook:_assign_kernel", "regs": 128, "spills": 0, "shared": 20480, "num_warps": 16,
                      "num_stages": 2}],
        "offline": "triton has no offline compile API here",
    }  # fmt: skip
    (tmp_path / "kernel_resources.json").write_text(json.dumps(resources))
    train = [
        {"benchmark": "train_throughput", "impl": impl, "compiled": True, "audio_seconds_per_s": speed, "mfu": mfu}
        for impl, speed, mfu in (("spidr_fast", 300.0, 0.4), ("reference", 100.0, 0.1))
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({**RECORD, **r}) + "\n" for r in train) + "{cut")
    report = gpu_report.write_report(tmp_path).read_text()
    assert "bf16 GEMM 790 TFLOP/s, device copy 4300 GB/s" in report
    assert "| codebook:_assign_kernel | 128 | 0 | 20480 | 16 | 2 |" in report
    assert "Not available: triton has no offline compile API here" in report
    assert "| training step vs reference 0.2.0, compiled | > 1x | 3.00 | met |" in report
    assert "| training MFU, compiled | >= 35% | 40.0% | met |" in report
    assert "| tests-kernels | 3 | 1 | 0 | 1 | 2.5 |" in report
    assert "tests.kernels.test_x::test_b (failure): assert 1 == 2" in report
    assert f"| {group} | triton | 1.000 | 100 | 3% | 10.0 | 15% fp32 | 6.00 | 3.00 |" in report  # H100 datasheet
    assert (
        "| codebook assign + accumulate vs the reference formulation, real step size | >= 5x | 6.00 | met |" in report
    )


HARVEST = """
import json, sys
sys.path.insert(0, "bench")
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import gpu_env

@triton.jit
def add_one(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs < n)

sig = {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}
kernel = triton.compile(ASTSource(fn=add_one, signature=sig, constexprs={"BLOCK": 128}),
                        target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 2})
class New:  # triton >= 3.3: device -> (kernel_cache, ..., target, backend, binder)
    device_caches = {0: ({"k": kernel}, {"k": "k"}, None, None, None)}
class Old:  # triton <= 3.2: device -> {key: kernel}
    cache = {0: {"k": kernel}}
found = gpu_env.compiled_variants(New()) + gpu_env.compiled_variants(Old())
print(json.dumps([gpu_env.describe_compiled(k) for k in found]))
"""


def test_kernel_resources_are_read_from_compiled_kernels(tmp_path: Path) -> None:
    """env-kernels reads every compiled variant out of triton's JIT caches (both cache layouts); without a
    driver the registers come from the cubin (a kernel compiled offline for sm_90 here)."""
    pytest.importorskip("triton")
    from bench.sm90 import triton_tools

    if isinstance(triton_tools(), str):
        pytest.skip(triton_tools())
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = tmp_path / "harvest.py"  # triton.jit reads the kernel's source from its file
    script.write_text(HARVEST)
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout)
    assert len(found) == 2
    for k in found:
        assert k["name"] == "add_one" and k["num_warps"] == 4 and k["spills"] == 0 and 0 < k["regs"] <= 255


def test_a_malformed_record_costs_its_section_only(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text(json.dumps({"benchmark": "train_throughput", "impl": "spidr_fast"}) + "\n")
    (tmp_path / "attention.jsonl").write_text(json.dumps({"backend": "masked", "dtype": "bfloat16", "status": "ok"}))
    report = gpu_report.write_report(tmp_path).read_text()
    assert "The training section could not be rendered" in report
    assert "| masked | bfloat16 | ok |" in report and "## 1. Environment" in report
