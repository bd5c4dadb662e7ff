"""Compile Triton kernels for an H100 (sm_90) without a GPU and read what the compiler made of them.

Triton compiles offline for any target with its bundled ptxas; its bundled cuobjdump then reports
registers per thread and stack (local-memory spill) bytes, and dumps the SASS, where tensor-core
instructions (HMMA, HGMMA) can be told from scalar fp32 ones (FFMA). These are static compiler
facts, not timings, yet they catch what the interpreter hides: an accumulator tile spilled to
local memory, a 255-register kernel (low occupancy), a bf16 GEMM running on FFMA.

The kernel tests run triton in interpreter mode (TRITON_INTERPRET=1 set at collection), under
which nothing compiles, so the work runs in a child process: `compile_sm90` / `compile_many`
start `python bench/sm90.py` with the specs as JSON on stdin and read JSON back. A tool, not a
test: the kernel tests (tests/kernels/test_*.py, `-k sm90`) and bench/gpu_env.py import it.

A spec names the kernel as "module:function" (or passes the function: its module must import
cleanly), its runtime arguments and its constexprs:
  * `signature`: parameter -> a type string ("*bf16", "*fp32", "i32", "fp32"), or a Python int, which
    is specialised as a launch would specialise it (1 -> constexpr, a multiple of 16 -> "i32" with
    divisibility 16, so that the SASS matches the one compiled at launch). Pointers are taken as
    16-byte aligned, as torch allocations are.
  * `constexprs`: parameter -> value (None for an absent optional pointer).
  * `num_warps`, `num_stages`.
Result per spec: {"regs", "stack", "shared", "sass_counts" (opcode -> count over the kernel),
"loop_counts" (opcode -> count inside loop bodies: between a backward branch and its target)}.

`python bench/sm90.py --report` prints the table for the kernels at the base shapes
(bench/results/sm90_static_analysis.md).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP_EXIT = 3  # the child's exit status when it cannot compile here (no triton, no bundled tools, old API)
TENSOR_CORE_OPS = ("HMMA", "HGMMA", "IMMA", "IGMMA", "QGMMA", "WGMMA")


def triton_tools() -> dict[str, str] | str:
    """Paths of triton's bundled ptxas and cuobjdump, or why they are missing (without importing triton)."""
    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        return "triton is not installed"
    bindir = Path(next(iter(spec.submodule_search_locations))) / "backends" / "nvidia" / "bin"
    tools = {name: bindir / name for name in ("ptxas", "cuobjdump")}
    missing = [name for name, path in tools.items() if not os.access(path, os.X_OK)]
    if missing:
        return f"triton's bundled {', '.join(missing)} missing under {bindir}"
    return {name: str(path) for name, path in tools.items()}


def compile_many(specs: list[dict] | dict, timeout: float = 300) -> list[dict] | str:
    """Compile every spec in one child process (one torch + triton import). A list of results, or a
    string saying why nothing could be compiled here (the tests skip with it)."""
    tools = triton_tools()
    if isinstance(tools, str):
        return tools
    if isinstance(specs, list):
        specs = [dict(s, fn=_fn_name(s["fn"])) for s in specs]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SPIDR_FAST_BACKEND")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve())],
        input=json.dumps(specs),
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )
    if proc.returncode == SKIP_EXIT:
        return proc.stdout.strip() or "cannot compile for sm_90 here"
    if proc.returncode != 0:
        raise RuntimeError(f"sm_90 compilation failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout)


def compile_base_shapes(*groups: str) -> dict[str, dict] | str:
    """The kernels of `kernel_specs` whose name starts with one of `groups` ("codebook", "heads_ce"),
    with their launchers' configurations: name -> result (with its "spec"), or why not compiled.
    The specs are built in the child, where the launchers see no interpreter."""
    out = compile_many({"groups": list(groups)})
    return out if isinstance(out, str) else {r["spec"]["name"]: r for r in out}


def compile_sm90(fn, signature: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 3) -> dict | str:
    """One kernel: {"regs", "stack", "shared", "sass_counts", "loop_counts"} (or why it cannot compile)."""
    spec = {"fn": fn, "signature": signature, "constexprs": constexprs, "num_warps": num_warps}
    out = compile_many([dict(spec, num_stages=num_stages)])
    return out if isinstance(out, str) else out[0]


def base_shapes_or_skip(*groups: str) -> dict[str, dict]:
    """`compile_base_shapes`, or skip the calling test with the reason it cannot compile here."""
    import pytest

    results = compile_base_shapes(*groups)
    if isinstance(results, str):
        pytest.skip(f"cannot compile for sm_90 here: {results}")
    return results


def assert_fits(name: str, result: dict, max_regs: int) -> None:
    """No local-memory spills (STACK 0) and at most `max_regs` registers a thread."""
    print(name, {k: result[k] for k in ("regs", "stack", "shared") if k in result})
    assert result["stack"] == 0, f"{name} spills {result['stack']} B a thread"
    assert result["regs"] <= max_regs, f"{name} uses {result['regs']} registers (bound {max_regs})"


def tensor_core_ops(counts: dict[str, int]) -> int:
    return sum(n for op, n in counts.items() if op.split(".")[0] in TENSOR_CORE_OPS)


def _fn_name(fn) -> str:
    if isinstance(fn, str):
        return fn
    fn = getattr(fn, "fn", fn)  # a triton.jit function: the plain function it wraps
    return f"{fn.__module__}:{fn.__qualname__}"


# --------------------------------------------------------------------------------------------
# The child process
# --------------------------------------------------------------------------------------------

_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def _sass_counts(sass: str) -> tuple[Counter, Counter]:
    """Opcode counts over the kernel and inside its loops (a backward BRA closes a loop body)."""
    insns = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in _INSN.finditer(sass)]
    total = Counter(op.split(".")[0] for _, op, _ in insns)
    in_loop = [False] * len(insns)
    for i, (addr, op, rest) in enumerate(insns):
        target = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if target and int(target.group(1), 16) <= addr:
            lo = int(target.group(1), 16)
            for j, (a, _, _) in enumerate(insns[: i + 1]):
                if a >= lo:
                    in_loop[j] = True
    loop = Counter(op.split(".")[0] for (_, op, _), inside in zip(insns, in_loop) if inside)
    return total, loop


def cuobjdump(cubin: bytes, tools: dict[str, str], *flags: str, check: bool = True) -> list[str]:
    """The output of triton's bundled `cuobjdump FLAG` on a cubin, one string per flag (with `check=False`,
    a failed run gives its empty output rather than raising)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        run = [subprocess.run([tools["cuobjdump"], flag, f.name], capture_output=True, text=True) for flag in flags]
    if check:
        for r in run:
            r.check_returncode()
    return [r.stdout for r in run]


def resource_usage(text: str) -> dict[str, int] | None:
    """The resources of the (last) function in `cuobjdump --dump-resource-usage` output: its line
    `REG:40 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:412 TEXTURE:0 ...` as {"REG": 40, "STACK": 0, ...}
    (registers per thread; STACK: local-memory bytes, spills included). None when there is no such line."""
    lines = [ln for ln in text.splitlines() if "REG:" in ln]
    return {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", lines[-1])} if lines else None


def _compile_one(spec: dict, tools: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module_name, fn_name = spec["fn"].split(":")
    module = importlib.import_module(module_name)
    if hasattr(module, "KERNELS"):  # spidr_fast kernels are jitted at their first launch
        from spidr_fast.kernels._utils import jit_in_place

        jit_in_place(vars(module), module.KERNELS)
    fn = getattr(module, fn_name)
    consts = dict(spec["constexprs"])
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            continue
        value = spec["signature"][name]
        if isinstance(value, bool) or not isinstance(value, int):
            sig[name] = value
            if value.startswith("*"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif value == 1:
            sig[name], consts[name] = "constexpr", 1
        else:
            sig[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    options = {"num_warps": spec["num_warps"], "num_stages": spec.get("num_stages", 3)}
    capability = int(os.environ.get("SM90_CAPABILITY", "90"))  # `make gpu-check`: the device's own
    kernel = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)
    usage, sass = cuobjdump(kernel.asm["cubin"], tools, "--dump-resource-usage", "--dump-sass")
    fields = resource_usage(usage)
    if fields is None:
        raise RuntimeError(f"{spec['fn']}: no resource usage in cuobjdump's output:\n{usage[-2000:]}")
    total, loop = _sass_counts(sass)
    return {
        "regs": fields["REG"],
        "stack": fields["STACK"],
        "shared": kernel.metadata.shared,
        "sass_counts": dict(total),
        "loop_counts": dict(loop),
    }


def _child() -> int:
    tools = triton_tools()
    if isinstance(tools, str):
        print(tools)
        return SKIP_EXIT
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:  # an older or newer triton without the offline-compile API
        print(f"triton has no offline compile API here: {e}")
        return SKIP_EXIT
    # Triton <= 3.8 (the GPU machines run 3.6) assembles sm_90 with its bundled CUDA 12.x ptxas;
    # 3.9 switched sm_90 to the CUDA 13 one ("ptxas-blackwell"). Use the 12.x one for both unless
    # SM90_PTXAS=default: it is what the kernels will meet on the GPU. Fusion on: 3.6's default.
    if os.environ.get("SM90_PTXAS", "legacy") == "legacy":
        os.environ["TRITON_PTXAS_PATH"] = os.environ["TRITON_PTXAS_BLACKWELL_PATH"] = tools["ptxas"]
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    specs = json.loads(sys.stdin.read())
    if isinstance(specs, dict):  # {"groups": [...]}: the base-shape specs, built here (no interpreter)
        specs = [s for s in kernel_specs() if s["name"].split()[0] in specs["groups"]]
    print(json.dumps([dict(_compile_one(spec, tools), spec=spec) for spec in specs]))
    return 0


# --------------------------------------------------------------------------------------------
# The kernels at the base shapes (the tests and the --report table)
# --------------------------------------------------------------------------------------------


ASSIGN_CASES = (("fp32", "ieee"), ("bf16", "ieee"), ("fp32", "tf32x3"), ("bf16", "tf32x3"))
SEGMENT_SUM_DTYPES = ("fp32", "bf16")
HEADS_CASES = tuple((direction, dtype) for dtype in ("bf16", "fp32") for direction in ("fwd", "bwd"))
# The base codebook size, then wider ones (smaller row blocks, 16 warps); fp32 (FFMA tiles) stops at 512.
HEADS_VOCABULARIES = {"bf16": (256, 512, 1024), "fp32": (256, 512)}
H100_SHARED_MEMORY = 227 * 1024  # opt-in shared memory per block on sm_90


def heads_name(direction: str, dtype: str, V: int) -> str:
    return f"heads_ce {direction} {dtype}" + ("" if V == 256 else f" V={V}")


def kernel_names(group: str) -> list[str]:
    """Names of the `kernel_specs` of one group, without building them (for test parametrisation)."""
    if group == "codebook":
        return [f"codebook assign x={d} {p}" for d, p in ASSIGN_CASES] + [
            f"codebook segment_sum x={d}" for d in SEGMENT_SUM_DTYPES
        ]
    vocab = HEADS_VOCABULARIES
    return [heads_name(d, dtype, V) for V in vocab["bf16"] for d, dtype in HEADS_CASES if V in vocab[dtype]]


def kernel_specs() -> list[dict]:
    """Every codebook and heads kernel with the configuration its launcher picks on a GPU, at the
    base shapes: C=8, N=40_000, K=256, D=768 (codebook); C=8, N=40_000, H=768, V=256 (heads), and the
    heads at V=512 and 1024."""

    from spidr_fast.kernels import codebook as cbk

    N, K, D = 40_000, 256, 768  # C = 8 changes no stride the kernels specialise on
    specs = []
    for dtype, precision in ASSIGN_CASES:
        cfg = cbk.assign_config(K, D, precision)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        sig = {"x_ptr": f"*{dtype}", "c_ptr": "*fp32", "cnorm_ptr": "*fp32", "labels_ptr": "*i64"}
        sig.update(N=N, K=K, D=D, s_xc=N * D, s_xn=D, s_xd=1, s_cc=K * D, s_ck=D, s_cd=1, s_nc=K, s_lc=N)
        specs.append(
            {
                "name": f"codebook assign x={dtype} {precision}",
                "fn": "spidr_fast.kernels.codebook:_assign_kernel",
                "signature": sig,
                "constexprs": dict(cfg, INPUT_PRECISION=precision),
                "num_warps": warps,
                "num_stages": stages,
            }
        )
    for dtype in SEGMENT_SUM_DTYPES:
        cfg = cbk.accumulate_config(D)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        sig = {"x_ptr": f"*{dtype}", "order_ptr": "*i64", "offsets_ptr": "*i64", "sums_ptr": "*fp32"}
        sig.update(counts_ptr="*fp32", D=D, s_xc=N * D, s_xn=D, s_xd=1, s_oc=N, s_fc=K + 1, s_sc=K * D, s_sk=D, s_cc=K)
        specs.append(
            {
                "name": f"codebook segment_sum x={dtype}",
                "fn": "spidr_fast.kernels.codebook:_segment_sum_kernel",
                "signature": sig,
                "constexprs": cfg,
                "num_warps": warps,
                "num_stages": stages,
            }
        )
    for V in HEADS_VOCABULARIES["bf16"]:
        specs += heads_specs(N, 768, V)
    return specs


def heads_specs(N: int, H: int, V: int) -> list[dict]:
    """Both heads kernels, bf16 and fp32, with the configuration `launch_config` picks on an H100."""
    import torch

    from spidr_fast.kernels import heads_ce as hce

    specs = []
    for dtype in (dtype for dtype, vocabularies in HEADS_VOCABULARIES.items() if V in vocabularies):
        torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
        cfg = hce.launch_config(torch_dtype, V, on_gpu=True, shared_memory=H100_SHARED_MEMORY)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        bn = cfg["BLOCK_N"]
        nblk = -(-N // bn)
        common = {"h_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "labels_ptr": "*i64"}
        common.update(N=N, H=H, V=V, s_hc=N * H, s_hn=H, s_hh=1, s_wc=V * H, s_wv=H, s_wh=1, s_bc=V, s_bv=1)
        common.update(s_lc=N, s_ln=1)
        fwd = dict(common, loss_ptr="*fp32", lse_ptr="*fp32", psum_ptr="*fp32", s_oc=N, s_pc=nblk * V, s_pb=V)
        bwd = dict(common, lse_ptr="*fp32", gloss_ptr="*fp32", gh_ptr=f"*{dtype}", dlog_ptr=f"*{dtype}")
        bwd.update(gb_ptr="*fp32", s_oc=N, s_gc=N, s_gn=1, s_ghc=N * H, s_ghn=H, s_dc=N * V, s_dn=V)
        bwd.update(s_pc=nblk * V, s_pb=V)
        for direction, sig in (("fwd", fwd), ("bwd", bwd)):
            specs.append(
                {
                    "name": heads_name(direction, dtype, V),
                    "fn": f"spidr_fast.kernels.heads_ce:_heads_ce_{direction}_kernel",
                    "signature": sig,
                    "constexprs": cfg,
                    "num_warps": warps,
                    "num_stages": stages,
                }
            )
    return specs


def _report() -> int:
    results = compile_base_shapes(*(sys.argv[sys.argv.index("--report") + 1 :] or ("codebook", "heads_ce")))
    if isinstance(results, str):
        print(f"cannot compile for sm_90 here: {results}")
        return 1
    specs = [r["spec"] for r in results.values()]
    results = list(results.values())
    print("| kernel | config | REG | STACK | SHARED | tensor-core (loop) | FFMA (loop) | LDL/STL (all) |")
    print("|---|---|---|---|---|---|---|---|")
    for spec, r in zip(specs, results):
        cfg = ", ".join(f"{k}={v}" for k, v in spec["constexprs"].items() if k.isupper() and k != "INPUT_PRECISION")
        cfg += f", warps={spec['num_warps']}, stages={spec['num_stages']}"
        tc = tensor_core_ops(r["loop_counts"])
        tc_ops = "/".join(sorted(op for op in r["loop_counts"] if op in TENSOR_CORE_OPS)) or "-"
        ldst = r["sass_counts"].get("LDL", 0) + r["sass_counts"].get("STL", 0)
        ffma = r["loop_counts"].get("FFMA", 0)
        row = [spec["name"], cfg, r["regs"], r["stack"], r["shared"], f"{tc} {tc_ops}", ffma, ldst]
        print("| " + " | ".join(map(str, row)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(_report() if "--report" in sys.argv else _child())
