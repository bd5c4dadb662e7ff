"""ABX phone discriminability of extracted features, with fastabx (ZeroSpeech 2021's triphone ABX).

ITEM is an ABX item file (`spidr_fast.metrics.item_file` writes one from 10 ms alignments; the
ZeroSpeech / Libri-light ones work as they are). FEATURES is a flat OUTPUT_DIR of `spidr-fast
extract` (fileids as the item file's `#file`: `extract --flat`): `c.npy`, `c.layer6.npy` per layer,
`c.pt` (the tensor itself: `extract --layer 6 --format pt --flat` is what fastabx reads as it is) or
`c.pt` dicts.
`--layers 4,5,6,7` sweeps the layers extracted there (`extract --layer 4 --layer 5 ...`) and prints
a table; `--name probs --distance kl_symmetric` scores codebook posteriors (`extract --units
codebook-probs`). Features are at 50 Hz (a 20 ms frame step: the ZeroSpeech toolkit's `--file_extension
.npy` with a 0.02 s step reads the same folder).

fastabx is an optional dependency (`pip install fastabx`, Python >= 3.12): without it this command
says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

FASTABX_MISSING = (
    "spidr-fast abx needs the fastabx package (pip install fastabx, or pip install 'spidr_fast[abx]'); "
    "fastabx requires Python >= 3.12 and this is Python {version}. The item file and the features are already "
    "in the formats the ZeroSpeech toolkit reads (zrc-abx2 FEATURES ITEM --file_extension .npy)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `spidr-fast abx`."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "item", type=Path, help="ABX item file (#file onset offset #phone prev-phone next-phone speaker)"
    )
    parser.add_argument("features", type=Path, help="flat folder written by `spidr-fast extract`")
    parser.add_argument("--layers", help="comma-separated layers to compare, e.g. 4,5,6,7 (default: the only one)")
    parser.add_argument("--name", help="the array to score instead of layers: probs (extract --units codebook-probs)")
    parser.add_argument("--speaker", choices=["within", "across"], default="within", help="(default: within)")
    parser.add_argument("--context", choices=["within", "any"], default="within", help="(default: within)")
    parser.add_argument(
        "--distance", choices=["angular", "euclidean", "kl_symmetric"], default="angular", help="(default: angular)"
    )
    parser.add_argument("--frequency", type=int, default=50, help="feature frames per second (default: 50)")
    parser.add_argument("--max-size-group", type=int, default=10, help="as ZeroSpeech (default: 10)")
    parser.add_argument("--max-x-across", type=int, default=5, help="as ZeroSpeech (default: 5)")
    parser.add_argument("--seed", type=int, default=0, help="subsampling seed (default: 0)")


def sources(
    folder: Path, layers: list[int] | None, name: str | None = None
) -> list[tuple[str, str, Callable[[Path], object]]]:
    """(label, file extension, feature maker) per layer (or for the array `name`), for fastabx's `zerospeech_abx`."""
    from spidr_fast.kmeans import FeatureFolder

    out = []
    for layer in layers or [None]:
        found = FeatureFolder(folder, name if layer is None else f"layer{layer}")
        label = found.name or "features"
        if found.kind == "pt":
            out.append((label, ".pt", lambda p, f=found: _tensor(f.load(Path(p)))))
        else:
            extension = f".{found.name}.npy" if found.name else ".npy"
            out.append((label, extension, lambda p, f=found: _tensor(f.load(Path(p)))))
    return out


def _tensor(array: object) -> object:
    import numpy as np
    import torch

    return torch.from_numpy(np.array(array, dtype=np.float32))


def main(args: argparse.Namespace) -> int:
    """Print the ABX error rate per layer; exit status 2 without fastabx or on bad input."""
    try:
        from fastabx import zerospeech_abx
    except ImportError:
        print("spidr-fast abx: error: " + FASTABX_MISSING.format(version=sys.version.split()[0]), file=sys.stderr)
        return 2
    try:
        layers = [int(v) for v in args.layers.split(",")] if args.layers else None
    except ValueError:
        print(
            f"spidr-fast abx: error: --layers must be comma-separated integers, got {args.layers!r}", file=sys.stderr
        )
        return 2
    try:
        if not args.item.is_file():
            raise ValueError(f"{args.item}: no such item file")
        rows = []
        for label, extension, maker in sources(args.features, layers, args.name):
            error = zerospeech_abx(
                args.item, args.features, max_size_group=args.max_size_group, max_x_across=args.max_x_across,
                speaker=args.speaker, context=args.context, distance=args.distance, frequency=args.frequency,
                feature_maker=maker, extension=extension, seed=args.seed,
            )  # fmt: skip
            rows.append((label, float(error)))
    except (ValueError, OSError) as exc:
        print(f"spidr-fast abx: error: {exc}", file=sys.stderr)
        return 2
    print(f"ABX error, {args.speaker} speaker, {args.context} context, {args.distance} ({args.item})")
    print("| features | ABX error (%) |\n|---|---|")
    for label, error in rows:
        print(f"| {label} | {100 * error:.2f} |")
    return 0
