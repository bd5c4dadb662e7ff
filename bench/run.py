"""Run every benchmark once: the kernel microbenchmarks, training and extraction throughput, the report.

    python bench/run.py            # full (a GPU machine: under 10 minutes on one H100)
    python bench/run.py --smoke    # CPU, tiny shapes, checks the harness (the test suite runs this)

Results go to --out (default bench/results/): JSON lines per throughput script, the
pytest-benchmark JSON of the kernels, and REPORT.md rendered from them.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, CPU-friendly, checks the harness")
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tag = "smoke" if args.smoke else torch.cuda.get_device_name().split()[-1].lower() if device == "cuda" else "cpu"
    smoke = ["--smoke", "--device", "cpu"] if args.smoke else []  # the smoke run checks the harness, on the CPU
    steps: list[list[str]] = [
        [
            sys.executable, "-m", "pytest", "-q", str(BENCH), "--benchmark-only", "-p", "no:cacheprovider",
            f"--benchmark-json={args.out / f'kernels_{tag}.json'}", *(["-k", "smoke"] if args.smoke else []),
        ],
        [sys.executable, str(BENCH / "train_throughput.py"), *smoke, "--out", str(args.out / f"train_{tag}.jsonl")],
    ]  # fmt: skip
    if (BENCH / "extract_throughput.py").is_file():
        steps.append(
            [
                sys.executable,
                str(BENCH / "extract_throughput.py"),
                *smoke,
                "--out",
                str(args.out / f"extract_{tag}.jsonl"),
            ]
        )
        units = ["--experiment", "units", "--out", str(args.out / f"extract_units_{tag}.jsonl")]
        steps.append([sys.executable, str(BENCH / "extract_throughput.py"), *smoke, *units])
    failed = []
    for cmd in steps:
        print("+", " ".join(cmd), flush=True)
        if subprocess.run(cmd, check=False).returncode != 0:
            failed.append(Path(cmd[1] if cmd[1] != "-m" else cmd[2]).name)
    jsonl = sorted(args.out.glob(f"*_{tag}.jsonl"))
    subprocess.run(
        [sys.executable, str(BENCH / "report.py"), *map(str, jsonl), "--out", str(args.out / f"REPORT_{tag}.md")],
        check=True,
    )
    if failed:
        print(f"benchmark step(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
