"""bench/roofline.py's instruction-issue bound: an op's time is at least its instructions (ISSUE_INSTRUCTIONS per
element, from the sm_90 SASS that bench/sass_per_element.py counts) over the issue rate of spidr_fast/devices.py."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from spidr_fast import devices

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import roofline  # noqa: E402
import roofline_model  # noqa: E402

from bench import sass_per_element as spe  # noqa: E402

N = 10**8
HEAVY = "spidr_fast::conv0_layer_norm_gelu"  # still issue-bound on an H100 (the channel LN + GELU no longer is)


def _op(name: str, elements: int, nbytes: int, ins: list[int] = (), outs: list[int] = ()) -> roofline.Op:
    return roofline.Op(name, roofline.op_class(name), "student layers", "fwd", "student.layers.0", 0, True, nbytes,
                       0, 1, 1, list(ins), list(outs), elements)  # fmt: skip


def _summary(ops: list[roofline.Op], device: str = "H100", compiled=None, value_bytes=()) -> dict:
    return roofline.summarize(roofline.Trace(ops, list(value_bytes), 1.0, compiled, 0), device)


def test_an_instruction_heavy_op_takes_its_issue_time() -> None:
    """The fused first conv + channel LayerNorm + exact-erf GELU writing bf16 y (2 bytes an element) issues ~55
    instructions an element: longer than its bytes take on an H100, so its time is the issue bound; an add over the
    same bytes stays memory-bound."""
    h100 = devices.lookup("H100")
    issue_ms = roofline.ISSUE_INSTRUCTIONS["_wave_ln_gelu_fwd_kernel"] * N / h100.issue_rate * 1e3
    memory_ms = 2 * N / (h100.hbm * roofline.EFFICIENCY["memory"][0]) * 1e3
    assert issue_ms > memory_ms
    row = _summary([_op(HEAVY, N, 2 * N)])["classes"]["norm/elementwise"]
    assert row["ms"] == pytest.approx(issue_ms)
    assert row["issue_bound_ms"] == pytest.approx(issue_ms)
    assert row["memory_ms"] == pytest.approx(memory_ms)
    row = _summary([_op("add", N, 2 * N)])["classes"]["norm/elementwise"]
    assert row["ms"] == pytest.approx(memory_ms)
    assert row["issue_bound_ms"] == 0
    assert row["issue_ms"] == pytest.approx(roofline.ISSUE_INSTRUCTIONS["add"] * N / h100.issue_rate * 1e3)


def test_the_report_names_the_issue_bound_classes() -> None:
    s = _summary([_op(HEAVY, N, 2 * N), _op("mm", 0, 4 * N)])
    table = roofline.bounds_table({"spidr_fast": s})
    assert "in: norm/elementwise." in table


def test_custom_ops_are_charged_their_kernels() -> None:
    """The fused channel LayerNorm + GELU backward runs `_cln_gelu_bwd_kernel` over its largest tensor; the pos-conv
    backward all three of its kernels; GEMMs and convs have no issue term."""
    cln = _op("spidr_fast::channel_layer_norm_gelu_backward", N, 8 * N)
    assert roofline.issue_instructions(cln) == roofline.ISSUE_INSTRUCTIONS["_cln_gelu_bwd_kernel"] * N
    pos = _op("spidr_fast::pos_conv_backward", N, 8 * N)
    rows = ("_pos_conv_ln_gelu_bwd_kernel", "_pos_conv_dw_kernel", "_pos_conv_kernel dx")
    assert roofline.issue_instructions(pos) == pytest.approx(sum(roofline.ISSUE_INSTRUCTIONS[k] for k in rows) * N)
    assert roofline.issue_instructions(_op("mm", N, N)) == 0
    assert roofline.issue_instructions(_op("convolution", N, N)) == 0


def test_the_device_constants_come_from_spidr_fast_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    """Halving the H100's clock in spidr_fast/devices.py doubles an issue-bound op's time."""
    ops = [_op(HEAVY, N, 2 * N)]
    before = _summary(ops)["ms"]
    h100 = devices.DEVICES["H100 SXM"]
    monkeypatch.setitem(devices.DEVICES, "H100 SXM", dataclasses.replace(h100, clock=h100.clock / 2))
    assert roofline.device_peaks("H100")["issue"] == h100.issue_rate / 2
    assert _summary(ops)["ms"] == pytest.approx(2 * before)


def test_a_fused_run_pays_one_load_store_overhead() -> None:
    """gelu then add in one compiled region: each keeps its own instructions less a standalone kernel's loads and
    stores ("copy"), and the run pays that overhead once over its largest tensor."""
    ops = [_op("gelu", N, 4 * N, ins=[0], outs=[1]), _op("add", N, 6 * N, ins=[1, 2], outs=[3])]
    tr = roofline.Trace(ops, [2 * N] * 4, 1.0, lambda op: "layer", 0)
    issued = roofline_model._fused_costs(tr)[3]
    c = roofline.ISSUE_INSTRUCTIONS
    assert sum(issued) == pytest.approx((c["gelu"] - c["copy"] + c["add"] - c["copy"] + c["copy"]) * N)
    assert issued[0] / issued[1] == pytest.approx(4 / 6)  # shared as the traffic is


def test_the_trace_records_the_largest_tensors_elements() -> None:
    ops = roofline.trace_fn(lambda: F.gelu(torch.empty(4, 5, device="meta")) + torch.empty(5, device="meta"))
    assert [(op.name, op.elements) for op in ops] == [("gelu", 20), ("add", 20)]


def _launched_kernels() -> dict[str, list[str]]:
    """Module -> the Triton kernels it launches (its KERNELS entries named `*_kernel`; the others are helpers)."""
    out = {}
    for path in sorted((ROOT / "kernels").glob("*.py")):
        module = importlib.import_module(f"spidr_fast.kernels.{path.stem}")
        out[path.stem] = [k for k in getattr(module, "KERNELS", ()) if k.endswith("_kernel")]
    return out


def test_every_triton_kernel_has_an_instruction_count() -> None:
    kernels = _launched_kernels()
    assert {m for m, ks in kernels.items() if ks} == {"conv_frontend", "conv0", "pos_conv", "codebook", "heads_ce"}
    rows = {key.split()[0] for key in roofline.ISSUE_INSTRUCTIONS}
    missing = [k for ks in kernels.values() for k in ks if k not in rows]
    assert not missing, f"no ISSUE_INSTRUCTIONS row (run bench/sass_per_element.py): {missing}"


def test_every_triton_custom_op_maps_onto_counted_kernels() -> None:
    """Each spidr_fast custom op outside attention (FlashAttention: its efficiency carries it) names its kernels in
    ISSUE_KERNELS, each a row of ISSUE_INSTRUCTIONS, and every kernel row is run by some op."""
    ops = set()
    for path in (ROOT / "kernels").glob("*.py"):
        if path.stem != "attention":
            ops.update(re.findall(r'custom_op\("(spidr_fast::\w+)"', path.read_text()))
    assert len(ops) >= 11
    assert not ops - set(roofline.ISSUE_KERNELS), ops - set(roofline.ISSUE_KERNELS)
    named = {k for ks in roofline.ISSUE_KERNELS.values() for k in ks}
    assert named <= set(roofline.ISSUE_INSTRUCTIONS)
    kernel_rows = {k for k in roofline.ISSUE_INSTRUCTIONS if k.split()[0].endswith("_kernel")}
    assert kernel_rows <= named


def test_per_element_counts_each_instruction_times_its_loops_trips() -> None:
    """Instructions 2-5 form a loop (3 trips) inside the loop 1-7 (2 trips); 9 is the trap loop (`BRA` to itself):
    1 + 2 + 4 * 6 + 2 * 2 + 1 + 1 = 33 instructions a warp, 4 warps over 64 elements."""
    result = {"instructions": 10, "loops": [(2, 5), (1, 7), (9, 9)]}
    case = spe.Case("k", {"num_warps": 4}, 64, (3, 2))
    assert spe.per_element(result, case) == 33 * 4 * 32 / 64
    with pytest.raises(ValueError, match="2 loops in the SASS"):
        spe.per_element(result, spe.Case("k", {"num_warps": 4}, 64, (3,)))


def test_sass_loops_parses_backward_branches() -> None:
    from bench import sm90

    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   IADD3 R0, R0, 0x1, RZ ;
        /*0020*/                   ISETP.GE.AND P0, PT, R0, 0x10, PT ;
        /*0030*/              @!P0 BRA 0x10 ;
        /*0040*/                   EXIT ;
        /*0050*/                   BRA 0x50;
    """
    assert sm90.sass_loops(sass) == [(1, 3), (5, 5)]


def test_the_table_is_what_the_tool_counts() -> None:
    """bench/sass_per_element.py, run now (sm_90 compiles, no GPU), gives ISSUE_INSTRUCTIONS: the table is the tool's
    output for the kernels as they are (rerun the tool and paste its rows after changing a kernel or its tiles)."""
    import importlib.metadata

    version = re.search(r"triton ([\w.+-]+),", roofline.ISSUE_SOURCE).group(1)
    try:
        installed = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("triton is not installed")
    if installed != version:
        pytest.skip(f"the table was counted with triton {version}, {installed} is installed")
    rows = spe.count(spe.kernel_cases() + spe.stand_in_cases())
    if isinstance(rows, str):
        pytest.skip(f"cannot compile for sm_90 here: {rows}")
    got = {case.key: round(n, 1) for case, _, n in rows}
    assert got == roofline.ISSUE_INSTRUCTIONS


def test_the_tool_and_the_table_agree_on_their_rows() -> None:
    keys = [c.key for c in spe.stand_in_cases()]
    assert keys == [k for k in roofline.ISSUE_INSTRUCTIONS if not k.split()[0].endswith("_kernel")]
    tree = ast.parse((ROOT / "bench" / "sass_per_element.py").read_text())
    names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    assert set(spe.KERNELS) <= names
