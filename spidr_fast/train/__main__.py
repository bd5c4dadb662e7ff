"""`python -m spidr_fast.train CONFIG.toml [section.field=value ...]` (what torchrun launches)."""

import argparse
import sys

from spidr_fast.train.cli import add_arguments, main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m spidr_fast.train", description=__doc__)
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
