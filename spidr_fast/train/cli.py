"""Pretrain SpidR/DinoSR: `spidr-fast train CONFIG.toml [section.field=value ...]`.

CONFIG is a TOML file (the reference's sections: run, data, model, optimizer, masking, validation)
or a shipped preset name (`base`, `tiny`). Rerunning the same command resumes from the latest
checkpoint of the run folder. For several GPUs: `torchrun --nproc-per-node N -m spidr_fast.train ...`.
"""

from __future__ import annotations

import argparse
import logging
import sys

from spidr_fast.train.config import read_config
from spidr_fast.train.step import NonFiniteLossError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="TOML config, or a preset name: base, tiny")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value", help="e.g. optimizer.max_steps=1000")


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from spidr_fast.train.trainer import train

    try:
        cfg = read_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"spidr-fast train: {e}", file=sys.stderr)
        return 2
    try:
        train(cfg)
    except NonFiniteLossError as e:
        print(f"spidr-fast train: {e}", file=sys.stderr)
        return 1
    return 0
