"""`make gpu-check OUT=DIR`: everything a first GPU session must measure, in one command, in <= 8.5 minutes.

    python bench/gpu_check.py --out DIR                       # on a GPU machine (one H100/H200)
    python bench/gpu_check.py --out DIR --reference-path SRC  # the reference from a source checkout
    python bench/gpu_check.py --out DIR --smoke               # CPU, tiny shapes: checks the harness

Each step runs in its own process under its own time limit (SIGINT at the limit, so pytest and
the writers flush what they have, then SIGKILL), and the whole run under `--budget` seconds.
A step that needs something missing (CUDA, the reference package, pytest-benchmark, flash-attn)
is skipped and says why. Everything lands in DIR: `env.json`, `kernel_resources.json`,
`junit_*.xml`, `kernels.json` (pytest-benchmark), `train.jsonl`, `profile.json`, `roofline.json`, `extract.jsonl`,
`attention.jsonl`, `stages.jsonl` (one line per step: status, reason, seconds), a log per step
under `logs/`, and `REPORT.md` rendering all of it.

Stages:
 1. environment (GPU, clocks, driver, versions, optional packages) and the registers, spills and
    shared memory of every Triton kernel as compiled for this device;
 2. every kernel test on CUDA, then every `gpu`-marked test (JUnit XML);
 3. kernel microbenchmarks at a real step's sizes (~6k masked frames, ~11.4k frames per GPU) and
    at 40k frames: the reference formulation, its batched form, torch.compile of it, ours;
 4. training throughput (base, bf16, eager and compiled, ours and the reference on the same
    batches; audio-s/s per GPU, MFU, peak memory), the ablation (each fused op off in turn) and
    a 20-step profile summarised per kernel class, and bench/roofline.py's predicted per-class
    times for the same batches beside the measured ones (measured / predicted: its calibration);
 5. extraction throughput (layer 6 and all layers, batch 1 and batched, fp32 and bf16) against
    the reference's get_intermediate_outputs, and attention: a padded batch through each padded backend,
    a dense one through each dense backend (the fastest beside the default table's choice).

The reference is the installed `spidr` package unless `--reference-path DIR` (or the variable
SPIDR_REFERENCE_PATH) names a source checkout, which is then put first on PYTHONPATH; the report
says which one was measured (version, location, git describe).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
import gpu_report  # noqa: E402

# Seconds per step. They sum to the default budget of 510 s (8.5 minutes on one H100).
LIMITS = {
    "env": 20,
    "env-kernels": 45,  # compiles every Triton kernel once: later steps hit triton's cache
    "tests-kernels": 60,
    "tests-gpu": 25,
    "kernels": 60,
    "train-eager": 40,
    "train-compiled": 60,
    "train-compiled-ref": 65,
    "train-ablation": 30,
    "train-profile": 20,
    "train-roofline": 30,  # CPU only: bench/roofline.py traces each profiled batch shape on meta tensors
    "extract": 35,
    "attention": 20,  # every padded and dense attention backend, timed here only (not in "kernels")
}
# The microbenchmarks gpu-check runs (bench/test_bench_*.py, GPU shapes): bf16 conv front-end (both ops) only
# (test_bench_pos_conv.py has bf16 GPU cases only), and no attention (step "attention" times every
# attention backend, with its errors against fp32: timed once).
KERNEL_SELECTION = "not ((conv_frontend or conv0) and fp32) and not attention"


@dataclasses.dataclass
class Context:
    out: Path
    python: str
    smoke: bool
    env: dict[str, Any]  # bench/gpu_env.py's output (empty until the env step ran)
    child_env: dict[str, str]

    @property
    def device(self) -> str:
        return "cuda" if self.env.get("cuda_available") and not self.smoke else "cpu"

    def has(self, package: str) -> bool:
        if package == "spidr":
            return bool(self.env.get("reference", {}).get("available"))
        return bool(self.env.get("packages", {}).get(package, {}).get("available"))


@dataclasses.dataclass
class Step:
    name: str
    stage: int
    title: str
    command: Callable[[Context], list[str]]
    needs: tuple[str, ...] = ()  # "cuda" and/or package names (see Context.has)
    in_smoke: bool = True  # runs on the CPU (tiny) under --smoke


def _py(ctx: Context, *args: str) -> list[str]:
    return [ctx.python, *args]


def _pytest(ctx: Context, *args: str) -> list[str]:
    # A module that cannot be imported (say, soundfile missing) fails alone, not the whole run.
    common = ["-q", "-p", "no:cacheprovider", "-o", "junit_family=xunit1", "--continue-on-collection-errors"]
    return _py(ctx, "-m", "pytest", *common, *args)


def _tests_kernels(ctx: Context) -> list[str]:
    parallel = ["-n", "4"] if ctx.has("xdist") else []
    return _pytest(ctx, "tests/kernels", *parallel, f"--junitxml={ctx.out / 'junit_kernels.xml'}")


def _kernels(ctx: Context) -> list[str]:
    select = ["-k", "smoke and not attention"] if ctx.smoke else ["-m", "gpu", "-k", KERNEL_SELECTION]
    return _pytest(
        ctx,
        "bench",
        "--benchmark-only",
        *select,
        f"--benchmark-json={ctx.out / 'kernels.json'}",
        f"--junitxml={ctx.out / 'junit_bench.xml'}",
    )


def _train(ctx: Context, *args: str, impl: tuple[str, ...] = ("spidr_fast", "reference")) -> list[str]:
    impl = [i for i in impl if i != "reference" or ctx.has("spidr")]
    size = (
        "--config tiny --steps 1 --warmup 1 --batches 1"
        if ctx.smoke
        else "--config base --steps 6 --warmup 3 --batches 3"
    )
    cmd = [str(BENCH / "train_throughput.py"), "--device", ctx.device, "--dtype", "bf16", *shlex.split(size)]
    return _py(ctx, *cmd, "--impl", *impl, "--out", str(ctx.out / "train.jsonl"), *args)


def _profile(ctx: Context) -> list[str]:
    size = ["--smoke"] if ctx.smoke else ["--config", "base", "--steps", "20"]
    return _py(
        ctx, str(BENCH / "profile_step.py"), "--device", ctx.device, *size, "--out", str(ctx.out / "profile.json")
    )


def _extract(ctx: Context) -> list[str]:
    ref = [] if ctx.has("spidr") else ["--no-reference"]
    if ctx.smoke:
        size = shlex.split("--smoke --num-utts 3 --layers 3 all")
    else:  # 16 LibriSpeech-like utterances (~190 s); ours one at a time and in 200 s batches
        size = shlex.split("--config base --num-utts 16 --ref-batches 1 8 --repeats 2 --layers 6 all")
    size += ["--batch-seconds", "0.01", "16" if ctx.smoke else "200", "--dtypes", "float32", "bfloat16", *ref]
    return _py(
        ctx,
        str(BENCH / "extract_throughput.py"),
        "--device",
        ctx.device,
        *size,
        "--out",
        str(ctx.out / "extract.jsonl"),
    )


STEPS = [
    Step("env", 1, "environment", lambda c: _py(c, str(BENCH / "gpu_env.py"), "--out", str(c.out / "env.json"))),
    Step(
        "env-kernels",
        1,
        "kernel registers / spills / shared memory",
        lambda c: _py(c, str(BENCH / "gpu_env.py"), "--kernels", "--out", str(c.out / "kernel_resources.json")),
        needs=("cuda",),
        in_smoke=False,
    ),
    Step("tests-kernels", 2, "kernel tests on CUDA", _tests_kernels, needs=("cuda",), in_smoke=False),
    Step(
        "tests-gpu",
        2,
        "gpu-marked tests",
        lambda c: _pytest(c, "tests", "-m", "gpu", "--ignore=tests/kernels", f"--junitxml={c.out / 'junit_gpu.xml'}"),
        needs=("cuda",),
        in_smoke=False,
    ),
    Step("kernels", 3, "kernel microbenchmarks", _kernels, needs=("cuda", "pytest_benchmark")),
    Step("train-eager", 4, "training throughput, eager", lambda c: _train(c, "--modes", "eager"), needs=("cuda",)),
    Step(
        "train-compiled",
        4,
        "training throughput, compiled (spidr_fast)",
        lambda c: _train(c, "--modes", "compiled", impl=("spidr_fast",)),
        needs=("cuda",),
        in_smoke=False,
    ),
    Step(
        "train-compiled-ref",
        4,
        "training throughput, compiled (reference)",
        lambda c: _train(c, "--modes", "compiled", impl=("reference",)),
        needs=("cuda", "spidr"),
        in_smoke=False,
    ),
    Step(
        "train-ablation",
        4,
        "ablation: each fused op off in turn",
        lambda c: _train(c, "--modes", "--ablation", "off-one"),
        needs=("cuda",),
    ),
    Step("train-profile", 4, "20-step profile per kernel class", _profile, needs=("cuda",)),
    Step(
        "train-roofline",
        4,
        "roofline's predicted per-class times beside the profile's",
        lambda c: _py(
            c, str(BENCH / "profile_roofline.py"), str(c.out / "profile.json"), "--out", str(c.out / "roofline.json")
        ),
        needs=("cuda",),
    ),
    Step("extract", 5, "extraction throughput", _extract, needs=("cuda",)),
    Step(
        "attention",
        5,
        "attention: each padded and dense backend",
        lambda c: _py(
            c,
            str(BENCH / "attention_backends.py"),
            "--device",
            c.device,
            *(["--smoke"] if c.smoke else []),
            "--out",
            str(c.out / "attention.jsonl"),
        ),
        needs=("cuda",),
    ),
]


def missing(step: Step, ctx: Context) -> str | None:
    """Why `step` cannot run here, or None."""
    if ctx.smoke and not step.in_smoke:
        return "--smoke: GPU-only step"
    if not ctx.env:
        return "the environment probe (step env) failed: see logs/env.log"
    for need in step.needs:
        if need == "cuda" and not ctx.smoke and not ctx.env.get("cuda_available"):
            return f"no CUDA device: {ctx.env.get('no_cuda_reason', 'torch.cuda.is_available() is False')}"
        if need != "cuda" and not ctx.has(need):
            info = ctx.env.get("reference", {}) if need == "spidr" else ctx.env["packages"].get(need, {})
            what = "the reference package spidr" if need == "spidr" else need
            return f"{what} is not importable ({info.get('error', 'missing')}): carry its wheel, see bench/README.md"
    return None


def run_step(cmd: list[str], log: Path, limit: float, env: dict[str, str]) -> tuple[str, int | None, str | None]:
    """Run `cmd` in its own process group; (status, return code, reason). At the limit: SIGINT (pytest and
    the benchmark writers flush what they have), 15 s grace, then SIGKILL of the group."""
    with open(log, "w", encoding="utf-8") as f:
        f.write("+ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            for sig, grace in ((signal.SIGINT, 15), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            return "timeout", proc.returncode, f"ran past its {limit:.0f} s limit (partial results kept)"
    if rc != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:] or [""]
        return "failed", rc, f"exit status {rc}: {tail[0][:300]}"
    return "ok", 0, None


def reference_path(arg: str | None) -> Path | None:
    """The folder to put on PYTHONPATH for a source checkout of the reference (DIR or DIR/src)."""
    if not arg:
        return None
    root = Path(arg).expanduser().resolve()
    for candidate in (root, root / "src"):
        if (candidate / "spidr" / "__init__.py").is_file():
            return candidate
    raise SystemExit(f"--reference-path {arg}: no spidr package there (looked for spidr/ and src/spidr/)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="results folder (created)")
    parser.add_argument(
        "--reference-path",
        default=os.environ.get("SPIDR_REFERENCE_PATH") or None,
        help="a source checkout of the reference to compare against (default: the installed spidr package; "
        "also SPIDR_REFERENCE_PATH)",
    )
    parser.add_argument("--budget", type=float, default=None, help="seconds for all steps together (default: 510)")
    parser.add_argument(
        "--limit",
        action="append",
        default=[],
        metavar="STEP=SECONDS",
        help=f"override a step's limit ({list(LIMITS)})",
    )
    parser.add_argument("--only", nargs="+", metavar="STEP", help="run only these steps (env always runs)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: checks the harness, measures nothing")
    args = parser.parse_args(argv)
    limits = {k: v * (4 if args.smoke else 1) for k, v in LIMITS.items()}  # shared CPU cores are slow
    for item in args.limit:
        name, _, seconds = item.partition("=")
        if name not in limits or not seconds.replace(".", "", 1).isdigit():
            raise SystemExit(f"--limit {item}: expected STEP=SECONDS with STEP one of {list(LIMITS)}")
        limits[name] = float(seconds)
    unknown = set(args.only or ()) - set(LIMITS)
    if unknown:
        raise SystemExit(f"--only: unknown step(s) {sorted(unknown)}; steps: {list(LIMITS)}")
    args.budget = args.budget or sum(limits.values())
    ref = reference_path(args.reference_path)
    out = args.out.resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    child_env = dict(os.environ, PYTHONUNBUFFERED="1")
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), child_env.get("PYTHONPATH")]))
    if ref is not None:
        child_env["PYTHONPATH"] = os.pathsep.join([str(ref), child_env["PYTHONPATH"]])
        child_env["SPIDR_REFERENCE_PATH"] = str(ref)
    if args.smoke:
        child_env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path, even on a GPU machine
    for stale in [out / "stages.jsonl", *(out / n for n in ("train.jsonl", "extract.jsonl", "attention.jsonl"))]:
        stale.unlink(missing_ok=True)  # JSONL writers append: start this run's files empty
    ctx = Context(out=out, python=sys.executable, smoke=args.smoke, env={}, child_env=child_env)
    started = time.monotonic()
    print(f"gpu-check -> {out} (budget {args.budget:.0f} s)", flush=True)
    for step in STEPS:
        record: dict[str, Any] = {"step": step.name, "stage": step.stage, "title": step.title}
        left = args.budget - (time.monotonic() - started)
        reason = missing(step, ctx) if step.name != "env" else None
        if args.only and step.name not in args.only and step.name != "env":
            reason = "not in --only"
        elif reason is None and left < 5:
            reason = f"the total budget of {args.budget:.0f} s is spent"
        t0 = time.monotonic()
        if reason:
            record.update(status="skipped", reason=reason, seconds=0.0)
        else:
            log = out / "logs" / f"{step.name}.log"
            status, rc, why = run_step(step.command(ctx), log, min(limits[step.name], left), child_env)
            record.update(status=status, returncode=rc, reason=why, log=f"logs/{log.name}")
            record["seconds"] = round(time.monotonic() - t0, 1)
            record["limit_s"] = limits[step.name]
        if step.name == "env" and (out / "env.json").is_file():
            ctx.env = json.loads((out / "env.json").read_text())
        with open(out / "stages.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        print(
            f"[{step.stage}] {step.name:>15}: {record['status']:>8} {record['seconds']:6.1f} s  {reason or ''}"
            + (record.get("reason") or "" if not reason else ""),
            flush=True,
        )
    total = time.monotonic() - started
    meta = {
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "total_seconds": round(total, 1),
        "budget_seconds": args.budget,
        "smoke": args.smoke,
        "reference_path": str(ref) if ref else None,
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
    }
    (out / "run.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    report = gpu_report.write_report(out)
    print(f"wrote {report} ({total:.0f} s)")
    statuses = [json.loads(line)["status"] for line in (out / "stages.jsonl").read_text().splitlines()]
    return 1 if any(s in ("failed", "timeout") for s in statuses) else 0


if __name__ == "__main__":
    sys.exit(main())
