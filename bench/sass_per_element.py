"""Instructions executed per element: the project's Triton kernels and stand-ins for Inductor/eager
elementwise ops, counted in their sm_90 SASS (compiled offline with `bench/sm90.py`, no GPU needed).

`bench/roofline.py` bounds each op's time by its instruction issue as well as by its FLOPs and bytes:
an H100 SM issues one warp-instruction per clock on each of its 4 schedulers, so an exact-erf GELU or a
LayerNorm (~70-100 instructions a value) can take longer than moving its bytes. This tool gives the
counts it uses (`ISSUE_INSTRUCTIONS` there, with this tool's command, triton version and commit).

Counting: a kernel's SASS listing is parsed into loops (a backward branch closes a body; the one-
instruction trap loop after EXIT is dropped). The instructions one warp executes per program are the
listing's instructions, each multiplied by the trip counts of the loops around it (the trips of the
source loops at the base shapes, `Case.trips`, in `sm90.sass_loops` order); every warp of the program
executes them, so thread-instructions per element = that x num_warps x 32 / the elements a program
covers (`Case.elements`: of the op's largest tensor, the unit `bench/roofline.py` charges). Branches
not taken are counted as taken and a pipelined loop's peeled iterations twice (an over-count of at most
(num_stages - 1) / trips of its body); masked lanes count, as they issue.

Stand-ins: the Inductor/eager elementwise ops (gelu and its backward, LayerNorm and its backward,
dropout and its backward, add, mul, casts, copies, a sum) as the small Triton kernels below, shaped as
Inductor emits them (1-D pointwise: 1024 elements, 4 warps; row reductions over D = 768: one row a
program, 8 warps). Dropout uses `tl.rand` (one Philox draw per element, as Inductor's; eager's kernel
draws four per call, so eager dropout costs fewer).

    .venv/bin/python bench/sass_per_element.py          # markdown table + the rows for bench/roofline_tables.py
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import sm90  # noqa: E402
from bench.common import environ  # noqa: E402

if TYPE_CHECKING:
    import triton.language as tl

# --------------------------------------------------------------------------------------------
# Stand-ins for the Inductor/eager ops (plain functions, jitted in bench/sm90.py's child)
# --------------------------------------------------------------------------------------------

KERNELS = ("_offsets", "_copy", "_cast", "_add", "_mul", "_gelu", "_gelu_backward", "_dropout", "_dropout_backward",
           "_layer_norm", "_layer_norm_backward", "_layer_norm_param_grads", "_row_sum")  # fmt: skip
POINTWISE_BLOCK, POINTWISE_WARPS = 1024, 4
ROW, ROW_BLOCK, ROW_WARPS = 768, 1024, 8


def _offsets(n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < n


def _copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs, mask = _offsets(n, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask), mask=mask)


def _cast(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs, mask = _offsets(n, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask).to(y_ptr.dtype.element_ty), mask=mask)


def _add(x_ptr, z_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs, mask = _offsets(n, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask) + tl.load(z_ptr + offs, mask=mask), mask=mask)


def _mul(x_ptr, z_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs, mask = _offsets(n, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask) * tl.load(z_ptr + offs, mask=mask), mask=mask)


def _gelu(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs, mask = _offsets(n, BLOCK)
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def _gelu_backward(dy_ptr, x_ptr, dx_ptr, n, BLOCK: tl.constexpr):
    offs, mask = _offsets(n, BLOCK)
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
    pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
    tl.store(dx_ptr + offs, (dy * (cdf + x * pdf)).to(dx_ptr.dtype.element_ty), mask=mask)


def _dropout(x_ptr, y_ptr, keep_ptr, n, seed, p, BLOCK: tl.constexpr):
    offs, mask = _offsets(n, BLOCK)
    keep = tl.rand(seed, offs) > p
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    tl.store(y_ptr + offs, tl.where(keep, x / (1 - p), 0.0).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(keep_ptr + offs, keep.to(tl.int8), mask=mask)


def _dropout_backward(dy_ptr, keep_ptr, dx_ptr, n, scale, BLOCK: tl.constexpr):
    offs, mask = _offsets(n, BLOCK)
    keep = tl.load(keep_ptr + offs, mask=mask) != 0
    dy = tl.load(dy_ptr + offs, mask=mask).to(tl.float32)
    tl.store(dx_ptr + offs, tl.where(keep, dy * scale, 0.0).to(dx_ptr.dtype.element_ty), mask=mask)


def _layer_norm(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, D, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / D
    xc = tl.where(mask, x - mean, 0.0)
    rstd = tl.math.rsqrt(tl.sum(xc * xc, axis=0) / D + eps)
    y = xc * rstd * tl.load(w_ptr + cols, mask=mask) + tl.load(b_ptr + cols, mask=mask)
    tl.store(y_ptr + row * D + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


def _layer_norm_backward(dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, D, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + row)
    xhat = tl.where(mask, (x - tl.load(mean_ptr + row)) * rstd, 0.0)
    g = dy * tl.load(w_ptr + cols, mask=mask, other=0.0)
    c1 = tl.sum(g * xhat, axis=0) / D
    c2 = tl.sum(g, axis=0) / D
    tl.store(dx_ptr + row * D + cols, ((g - (xhat * c1 + c2)) * rstd).to(dx_ptr.dtype.element_ty), mask=mask)


def _layer_norm_param_grads(dy_ptr, x_ptr, mean_ptr, rstd_ptr, dw_ptr, db_ptr, D, BLOCK_R: tl.constexpr,
                            BLOCK: tl.constexpr):  # fmt: skip
    """Partial sums over BLOCK_R rows of dy * xhat and dy for BLOCK columns (eager's second kernel; Inductor's
    column reduction): one (BLOCK_R, BLOCK) tile a program, no loop (a runtime trip count gets unrolled)."""
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    dy = tl.load(dy_ptr + offs, mask=mask[None, :], other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=mask[None, :], other=0.0).to(tl.float32)
    xhat = (x - tl.load(mean_ptr + rows)[:, None]) * tl.load(rstd_ptr + rows)[:, None]
    tl.store(dw_ptr + tl.program_id(1) * D + cols, tl.sum(dy * xhat, axis=0), mask=mask)
    tl.store(db_ptr + tl.program_id(1) * D + cols, tl.sum(dy, axis=0), mask=mask)


def _row_sum(x_ptr, y_ptr, D, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * D + cols, mask=cols < D, other=0.0).to(tl.float32)
    tl.store(y_ptr + row, tl.sum(x, axis=0))


# --------------------------------------------------------------------------------------------
# The cases and the count
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    key: str  # the row of bench/roofline_tables.py's ISSUE_INSTRUCTIONS: a kernel's name, or an aten op's
    spec: dict  # a bench/sm90.py spec
    elements: float  # elements of the op's largest tensor that one program covers
    trips: tuple[int, ...] = ()  # trip counts of the SASS loops (sm90.sass_loops order, trap loops dropped)
    note: str = ""


def per_element(result: dict, case: Case) -> float:
    """Thread-instructions per element of one compiled case (`result`: bench/sm90.py's, with "loops")."""
    loops = [(first, last) for first, last in result["loops"] if last > first]  # the trap loop: `BRA` to itself
    if len(loops) != len(case.trips):
        raise ValueError(f"{case.key}: {len(loops)} loops in the SASS {loops}, {len(case.trips)} trip counts given")
    executed = 0
    for i in range(result["instructions"]):
        executed += math.prod(trips for (first, last), trips in zip(loops, case.trips) if first <= i <= last)
    return executed * case.spec["num_warps"] * 32 / case.elements


def _stand_in(key: str, fn: str, signature: dict, constexprs: dict, warps: int, elements: float, **kw) -> Case:
    spec = {"name": key, "fn": f"bench.sass_per_element:{fn}", "signature": signature, "constexprs": constexprs,
            "num_warps": warps}  # fmt: skip
    return Case(key, spec, elements, **kw)


def stand_in_cases() -> list[Case]:
    n = 1 << 24
    pw = {"BLOCK": POINTWISE_BLOCK}
    row = {"BLOCK": ROW_BLOCK}
    b16, f32 = "*bf16", "*fp32"
    cases = [
        ("copy", "_copy", {"x_ptr": b16, "y_ptr": b16, "n": n}, "a bf16 copy (clone, copy_, contiguous)"),
        ("_to_copy", "_cast", {"x_ptr": f32, "y_ptr": b16, "n": n}, "fp32 -> bf16 (autocast's casts)"),
        ("add", "_add", {"x_ptr": f32, "z_ptr": f32, "y_ptr": f32, "n": n}, "fp32 + fp32"),
        ("mul", "_mul", {"x_ptr": f32, "z_ptr": f32, "y_ptr": f32, "n": n}, "fp32 * fp32"),
        ("gelu", "_gelu", {"x_ptr": b16, "y_ptr": b16, "n": n}, "exact erf GELU, bf16 in and out"),
        ("gelu_backward", "_gelu_backward", {"dy_ptr": b16, "x_ptr": b16, "dx_ptr": b16, "n": n}, "bf16"),
        (
            "native_dropout",
            "_dropout",
            {"x_ptr": b16, "y_ptr": b16, "keep_ptr": "*i8", "n": n, "seed": "i32", "p": "fp32"},
            "tl.rand (Philox per element), bf16, an int8 mask",
        ),
        (
            "native_dropout_backward",
            "_dropout_backward",
            {"dy_ptr": b16, "keep_ptr": "*i8", "dx_ptr": b16, "n": n, "scale": "fp32"},
            "bf16",
        ),
    ]
    out = [_stand_in(k, fn, sig, pw, POINTWISE_WARPS, POINTWISE_BLOCK, note=note) for k, fn, sig, note in cases]
    ln = {"x_ptr": b16, "w_ptr": f32, "b_ptr": f32, "y_ptr": b16, "mean_ptr": f32, "rstd_ptr": f32, "D": ROW}
    out.append(_stand_in("native_layer_norm", "_layer_norm", dict(ln, eps="fp32"), row, ROW_WARPS, ROW,
                         note=f"a row of D={ROW} a program, bf16 in and out"))  # fmt: skip
    lnb = {"dy_ptr": b16, "x_ptr": b16, "w_ptr": f32, "mean_ptr": f32, "rstd_ptr": f32, "dx_ptr": b16, "D": ROW}
    out.append(_stand_in("native_layer_norm_backward dx", "_layer_norm_backward", lnb, row, ROW_WARPS, ROW,
                         note=f"dx, a row of D={ROW} a program"))  # fmt: skip
    pg = {"dy_ptr": b16, "x_ptr": b16, "mean_ptr": f32, "rstd_ptr": f32, "dw_ptr": f32, "db_ptr": f32, "D": ROW}
    out.append(_stand_in("native_layer_norm_backward dw", "_layer_norm_param_grads", pg, {"BLOCK_R": 32, "BLOCK": 128},
                         4, 32 * 128, note="grad weight and bias partials, 32 rows x 128 columns"))  # fmt: skip
    out.append(_stand_in("sum", "_row_sum", {"x_ptr": f32, "y_ptr": f32, "D": ROW}, row, ROW_WARPS, ROW,
                         note=f"a row of D={ROW}"))  # fmt: skip
    return out


def kernel_cases() -> list[Case]:
    """The project's Triton kernels at the base shapes (16 x 15 s, base config) with the launchers' configs: the
    specs of the kernel tests' offline compiles (tests/kernels/test_*.py, `-k sm90`) and of `sm90.kernel_specs`."""
    from spidr_fast.kernels import conv0 as c0
    from spidr_fast.kernels import conv_frontend as cf
    from spidr_fast.kernels import pos_conv as pc
    from tests.kernels.test_conv0 import conv0_specs
    from tests.kernels.test_conv_frontend import conv_frontend_specs
    from tests.kernels.test_pos_conv import pos_conv_specs

    B = 16
    cases = []
    fwd, bwd = conv_frontend_specs(512, "bf16", True)
    tile = fwd["constexprs"]["BLOCK_C"] * fwd["constexprs"]["BLOCK_T"]
    cases.append(Case("_cln_gelu_fwd_kernel", fwd, tile, note="C=512, bf16"))
    T = 23_999  # the second conv block's frames: ITERS as its launcher picks them (and the later blocks' up to 5,999)
    tile = bwd["constexprs"]["BLOCK_C"] * bwd["constexprs"]["BLOCK_T"]
    iters = max(1, min(cf.MAX_ITERS, B * -(-T // bwd["constexprs"]["BLOCK_T"]) // cf.PARTIAL_ROWS))
    cases.append(Case("_cln_gelu_bwd_kernel", bwd, tile * iters, (iters,), f"C=512, bf16, {iters} T blocks"))
    fwd, bwd = conv0_specs("tf32")
    tile = fwd["constexprs"]["BLOCK_C"] * fwd["constexprs"]["BLOCK_T"]
    cases.append(Case("_wave_ln_gelu_fwd_kernel", fwd, tile, note="C=512, TF32 dot, bf16 y"))
    T = 47_999
    tile = bwd["constexprs"]["BLOCK_C"] * bwd["constexprs"]["BLOCK_T"]
    iters = max(1, min(c0.MAX_ITERS, B * -(-T // bwd["constexprs"]["BLOCK_T"]) // c0.PARTIAL_ROWS))
    bwd["signature"]["ITERS"] = iters
    cases.append(Case("_wave_ln_gelu_bwd_kernel", bwd, tile * iters, (iters,), f"TF32 dot, {iters} T blocks"))
    D, CG, K, T = 768, 48, 19, 749
    fwd, dx, ln_bwd, dw = pos_conv_specs("bf16")
    per_program = fwd["constexprs"]["BLOCK_T"] * D
    trips = (K, D // CG, -(-D // pc.BLOCK_D_NORM))  # the conv's taps, its groups, the LayerNorm + GELU's chunks
    cases.append(Case("_pos_conv_kernel", fwd, per_program, trips, "bf16, LayerNorm + GELU"))
    cases.append(Case("_pos_conv_kernel dx", dx, per_program, (K, D // CG), "bf16, the input gradient"))
    tile = ln_bwd["constexprs"]["BLOCK_T"] * D
    cases.append(Case("_pos_conv_ln_gelu_bwd_kernel", ln_bwd, tile, note="bf16"))
    n_blk = B * -(-T // pc.BLOCK_T_DW)
    chunks = min(n_blk, max(1, pc.DW_PROGRAMS // (K * D // CG)))
    iters = -(-n_blk // chunks)
    # each (tap, group) program reads (BLOCK_T, Cg) of dz per iteration: an element is read by K programs
    per_program = iters * pc.BLOCK_T_DW * CG / K
    cases.append(Case("_pos_conv_dw_kernel", dw, per_program, (iters,), f"bf16, {iters} T blocks"))
    with environ(TRITON_INTERPRET=None):  # the launchers' configs on a GPU, not the interpreter's
        specs = {s["name"]: s for s in sm90.kernel_specs()}
    N, Kc, D = 40_000, 256, 768
    assign = specs["codebook assign x=fp32 ieee"]
    c = assign["constexprs"]
    trips = (-(-D // c["BLOCK_D"]), -(-Kc // c["BLOCK_K"]))
    cases.append(Case("_assign_kernel", assign, c["BLOCK_N"] * D, trips, "x fp32, ieee (FFMA), K=256, D=768"))
    seg = specs["codebook segment_sum x=fp32"]
    rows = N / Kc  # frames per codeword, on average
    trips = (math.ceil(rows / seg["constexprs"]["BLOCK_R"]),)
    per_program = rows * seg["constexprs"]["BLOCK_D"]
    cases.append(Case("_segment_sum_kernel", seg, per_program, trips, f"x fp32, {rows:g} frames a codeword"))
    for direction, loops in (("fwd", 1), ("bwd", 2)):
        spec = specs[sm90.heads_name(direction, "bf16", 256)]
        c = spec["constexprs"]
        trips = (-(-D // c["BLOCK_H"]),) * loops
        cases.append(Case(f"_heads_ce_{direction}_kernel", spec, c["BLOCK_N"] * D, trips, "bf16, V=256, H=768"))
    return cases


def count(cases: list[Case]) -> list[tuple[Case, dict, float]] | str:
    """(case, compile result, instructions per element) for each case, or why nothing compiles here."""
    results = sm90.compile_many([c.spec for c in cases])
    if isinstance(results, str):
        return results
    return [(c, r, per_element(r, c)) for c, r in zip(cases, results)]


def provenance() -> str:
    """The triton version and the commit the counts come from."""
    import importlib.metadata

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return f"triton {importlib.metadata.version('triton')}, commit {commit.stdout.strip() or '?'}"


def main() -> int:
    rows = count(kernel_cases() + stand_in_cases())
    if isinstance(rows, str):
        print(f"cannot compile for sm_90 here: {rows}")
        return 1
    print(f"sm_90 SASS, {provenance()}: `.venv/bin/python bench/sass_per_element.py`\n")
    print("| key | instructions / element | SASS | loops (trips) | warps | elements / program | what |")
    print("|---|---:|---:|---|---:|---:|---|")
    for case, r, n in rows:
        loops = [f"{last - first + 1} ({t})" for (first, last), t in zip([lp for lp in r["loops"] if lp[1] > lp[0]],
                                                                         case.trips)]  # fmt: skip
        print(f"| {case.key} | {n:.1f} | {r['instructions']} | {', '.join(loops) or '-'} | {case.spec['num_warps']} "
              f"| {case.elements:,.0f} | {case.note} |")  # fmt: skip
    print("\nFor bench/roofline_tables.py's ISSUE_INSTRUCTIONS:\n")
    for case, _, n in rows:
        print(f'    "{case.key}": {n:.1f},')
    return 0


if __name__ == "__main__":
    sys.exit(main())
