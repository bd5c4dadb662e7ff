"""Pretrain SpidR/DinoSR: `spidr-fast train CONFIG.toml [section.field=value ...]`.

CONFIG is a TOML file (the reference's sections: run, data, model, optimizer, masking, validation)
or a shipped preset name (`base`, `tiny`, `demo`); any preset runs with either `run.model_type`.
Rerunning the same command resumes from the latest checkpoint of the run folder. For several GPUs:
`torchrun --nproc-per-node N -m spidr_fast.train ...`.
"""

from __future__ import annotations

import argparse
import logging
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="TOML config, or a preset name: base, tiny, demo")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value", help="e.g. optimizer.max_steps=1000")


def _audio_error_line(exc: Exception) -> str:
    """The "NAME: REASON" of an AudioError; a DataLoader worker's re-raise carries its traceback first."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[-1].split("AudioError: ", 1)[-1] if lines else str(exc)


def main(args: argparse.Namespace) -> int:
    # Imported here: `spidr-fast train --help` does not load torch.
    from spidr_fast.data.audio import AudioError
    from spidr_fast.train.config import read_config
    from spidr_fast.train.data import NoUsableDataError, audio_fix_hint
    from spidr_fast.train.step import NonFiniteLossError
    from spidr_fast.train.trainer import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = read_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"spidr-fast train: {e}", file=sys.stderr)
        return 2
    try:
        train(cfg)
    except (NonFiniteLossError, NoUsableDataError) as e:
        print(f"spidr-fast train: {e}", file=sys.stderr)
        return 1
    except AudioError as e:
        line = _audio_error_line(e)
        hint = audio_fix_hint([line])
        print(
            f"spidr-fast train: {line}\n"
            + (f"  to fix: {hint}\n" if hint else "")
            + "  or set data.skip_bad=true to skip unusable files (each is named once, with its reason)",
            file=sys.stderr,
        )
        return 1
    return 0
