"""`spidr-fast COMMAND ...` (also `python -m spidr_fast COMMAND ...`).

Each command lives in its own module, imported only when it runs, which exposes
`add_arguments(parser)` and `main(args) -> int` (the exit status).
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("spidr_fast.demo", "run the main job on built-in defaults (generate audio, extract, report)"),
    "extract": ("spidr_fast.extract", "extract features or units from audio files"),
    "manifest": ("spidr_fast.data.manifest", "write a manifest of the audio under a folder or tar"),
    "train": ("spidr_fast.train.cli", "pretrain SpidR/DinoSR from a TOML config"),
    "export": ("spidr_fast.train.export", "export a training checkpoint to the reference's released format"),
    "kmeans": ("spidr_fast.kmeans", "fit k-means units on extracted features"),
    "units-report": ("spidr_fast.units_report", "phone information of units (PNMI, purity, bitrate, figure)"),
    "abx": ("spidr_fast.abx", "ABX phone discriminability of extracted features (needs fastabx)"),
}


def main(argv: list[str] | None = None) -> int:
    from spidr_fast import __version__  # the package imports torch only when a model name is used

    parser = argparse.ArgumentParser(prog="spidr-fast", description="SpidR / DinoSR: fast training and extraction.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    argv = sys.argv[1:] if argv is None else argv
    for name, (module_name, help_text) in COMMANDS.items():
        # Only the chosen command's module is imported (keeps `--help` fast and one broken command isolated).
        if argv and argv[0] == name:
            module = importlib.import_module(module_name)
            module.add_arguments(sub.add_parser(name, help=help_text, description=module.__doc__))
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    args = parser.parse_args(argv)
    return int(importlib.import_module(COMMANDS[args.command][0]).main(args))


if __name__ == "__main__":
    sys.exit(main())
