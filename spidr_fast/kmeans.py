"""Fit k-means units on features written by `spidr-fast extract`, and save the centroids.

FEATURES is the OUTPUT_DIR of `spidr-fast extract` (searched recursively): `c.npy` per file (one
array extracted), `c.layer6.npy` per file and array (several), or `c.pt` (the tensor itself when one
array was extracted, else a dict of them). `--name` picks the array (layer6, ...) when there are
several; by default the only layer there is. The files are memory-mapped and read in chunks, once
per iteration: memory is bounded by a chunk, not by the corpus, unless --max-frames asks for a
subsample (drawn from --seed, held in memory).

With --checkpoint, FEATURES is audio instead (a folder, manifest or file, as for `extract`): the
--layer features are extracted in memory (held whole: frames x dim x 4 bytes) and never written.

Writes OUT.pt atomically (`spidr_fast.units.KMeans.load` reads it; `predict` gives units), and
prints the inertia at each iteration. Example:

    spidr-fast extract wavs/ feats/ --checkpoint spidr_base --layer 6
    spidr-fast kmeans feats/ kmeans256.pt --k 256 --max-frames 2000000
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

_NAMED = re.compile(r"^(?P<key>.+)\.(?P<name>layer\d+|units|durations|probs)\.npy$")  # extract: c.layer6.npy ...
NOT_FEATURES = ("units", "durations", "probs")  # probs (codebook posteriors): only when --name asks


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `spidr-fast kmeans`."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "features",
        type=Path,
        help="folder written by `spidr-fast extract` (.npy or .pt per file); with --checkpoint: audio (a folder, "
        "manifest or file) whose --layer features are extracted in memory",
    )
    parser.add_argument("output", type=Path, help="where to write the centroids (.pt)")
    parser.add_argument("--k", type=int, required=True, help="number of centroids (units)")
    parser.add_argument("--iters", type=int, default=100, help="most Lloyd iterations (default: 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subsamples and of k-means++ (default: 0)")
    parser.add_argument(
        "--max-frames", type=int, help="fit on a random subsample of this many frames (default: every frame)"
    )
    parser.add_argument("--n-init", type=int, default=1, help="k-means++ seedings; the best fit is kept (default: 1)")
    parser.add_argument("--name", help="which array when there are several per file (layer6, ...)")
    parser.add_argument("--checkpoint", help="extract FEATURES (audio) with this model in memory, writing no features")
    parser.add_argument("--layer", type=int, default=6, help="with --checkpoint: the layer, from 1 (default: 6)")
    parser.add_argument(
        "--after-residual", action="store_true", help="with --checkpoint: layer outputs instead of FFN outputs"
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    parser.add_argument(
        "--precision", choices=["fp32", "tf32x3", "tf32", "fp64"], default="fp32", help="arithmetic (default: fp32)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


class FeatureFolder:
    """The feature files of an `extract` OUTPUT_DIR for one array name, re-iterable (each pass maps
    the files again; nothing is kept open or in memory between passes)."""

    def __init__(self, folder: Path, name: str | None = None) -> None:
        if not folder.is_dir():
            raise ValueError(f"{folder}: not a folder (FEATURES is the OUTPUT_DIR of `spidr-fast extract`)")
        files = sorted(p for p in folder.rglob("*") if p.suffix in (".npy", ".pt") and not p.name.startswith("."))
        if not files:
            raise ValueError(f"{folder}: no .npy or .pt feature files below it")
        pt = [p for p in files if p.suffix == ".pt"]
        if pt:
            self.kind, self.paths = "pt", pt
            keys = _pt_names(pt[0])
        else:
            self.kind = "npy"
            named = {p: m["name"] for p in files if (m := _NAMED.match(p.name))}
            keys = sorted(set(named.values()))
        features = [k for k in keys if k not in NOT_FEATURES]
        if name is None:
            if not keys:  # one array per file: `c.npy`, or `c.pt` holding the tensor itself
                self.name, self.paths = None, files if self.kind == "npy" else pt
                return
            if len(features) != 1:
                raise ValueError(f"{folder}: several arrays per file ({', '.join(keys)}): choose one with --name")
            name = features[0]
        if name not in keys:
            raise ValueError(f"{folder}: no array named {name!r} (there are: {', '.join(keys) or 'none'})")
        self.name = name
        if self.kind == "npy":
            self.paths = [p for p, n in named.items() if n == name]

    def __iter__(self) -> Iterator[np.ndarray]:
        for path in self.paths:
            yield self.load(path)

    def load(self, path: Path) -> np.ndarray:
        if self.kind == "npy":
            array = np.load(path, mmap_mode="r")
        else:
            from spidr_fast.extraction.files import read_pt

            array = read_pt(path, self.name, mmap=True).float().numpy()
        if array.ndim != 2:
            raise ValueError(f"{path}: features must be (frames, dim), got shape {array.shape}")
        return array


def _pt_names(path: Path) -> list[str]:
    import torch

    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if isinstance(obj, torch.Tensor):
        return []  # the one array extracted
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: neither a tensor nor a dict of arrays written by `spidr-fast extract --format pt`")
    return sorted(obj)


def extract_in_memory(args: argparse.Namespace) -> tuple[list[np.ndarray], str]:
    """Layer `args.layer` of every audio input (sorted by output key, as `extract` would name them),
    as fp32 arrays in memory: memory grows with the corpus (frames x dim x 4 bytes); for a large
    corpus write the features with `extract` and fit on the folder (streamed) instead."""
    from spidr_fast.extraction import FeatureExtractor
    from spidr_fast.extraction.files import list_inputs, read_audio
    from spidr_fast.extraction.pipeline import load_checkpoint

    inputs = list_inputs(args.features)
    if not inputs:
        raise ValueError(f"{args.features}: no audio files")
    extractor = FeatureExtractor(load_checkpoint(args.checkpoint), layers=[args.layer], device=args.device,
                                 before_residual=not args.after_residual)  # fmt: skip

    decoded = ((item, read_audio(item)) for item in inputs)  # an unusable file: AudioError (a ValueError) naming it
    out = {item.key: result[f"layer{args.layer}"].numpy() for item, result in extractor.stream(decoded)}
    return [out[key] for key in sorted(out)], f"{len(out)} audio files (layer{args.layer}, extracted in memory)"


def main(args: argparse.Namespace) -> int:
    """Fit and save; exit status 2 on bad arguments or input."""
    try:
        return _run(args)
    except (ValueError, OSError) as exc:  # one line, no traceback
        print(f"spidr-fast kmeans: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from spidr_fast.units import KMeans

    if args.checkpoint:
        features, what = extract_in_memory(args)
    else:
        folder = FeatureFolder(args.features, args.name)
        features, what = folder, f"{len(folder.paths)} files" + (f" ({folder.name})" if folder.name else "")
    model = KMeans(args.k, iters=args.iters, seed=args.seed, device=args.device, precision=args.precision,
                   max_frames=args.max_frames, n_init=args.n_init)  # fmt: skip
    print(f"k-means: k={args.k} on {what} from {args.features}, device {model.device}, {args.precision}", flush=True)
    bar = tqdm(total=args.iters * args.n_init, unit="iter", disable=args.no_progress, file=sys.stderr)
    start = time.monotonic()

    def progress(iteration: int, inertia: float) -> None:
        bar.update(1)
        bar.set_postfix(inertia=f"{inertia:.6g}")
        tqdm.write(f"  iteration {iteration:4d}: inertia {inertia:.8g}", file=sys.stdout)

    with bar:
        model.fit(features, progress=progress)
    path = model.save(args.output)
    seconds = time.monotonic() - start
    print(f"done in {seconds:.1f} s: {model.n_iter_} iterations, inertia {model.inertia_:.8g}; centroids in {path}")
    return 0
