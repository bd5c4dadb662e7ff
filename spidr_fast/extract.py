"""Extract layer features and/or discrete units from audio files with SpidR or DinoSR.

INPUT is a folder (searched recursively for .wav/.flac/.ogg/.mp3/...), a manifest (.csv, .tsv,
.jsonl; see `spidr-fast manifest`) or one audio file. `a/b/c.flac` under INPUT becomes
OUTPUT_DIR/a/b/c.npy (or c.pt, the tensor itself); when several arrays are extracted (several
--layer, or --units) each goes to OUTPUT_DIR/a/b/c.<name>.npy (names: layer6, ..., units), or all
into one c.pt dict. --flat writes OUTPUT_DIR/c.npy (c.pt): outputs named by file id, as ABX item
files and fastabx want them (`--layer 6 --format pt --flat` is a folder fastabx reads as it is).
Features are (frames, D), 50 frames per second; units are (frames,) int64. Layers count from 1.

OUTPUT_DIR/extract_settings.json records the settings that decide the outputs (checkpoint hash,
layers, units, residual side, dtypes, format, chunking, version). A rerun with the same settings
skips complete outputs and redoes missing or partial ones; with other settings it is refused
(exit 2, naming each difference) unless --overwrite, which recomputes every output. Outputs are
written atomically, with the umask's permissions.

Files that cannot be used (unreadable, not audio, empty or shorter than 400 samples, NaN/Inf,
several channels, not 16 kHz, or sharing an output name: clip.wav and clip.ogg) are listed in
OUTPUT_DIR/failures.jsonl and the summary, the others are written, and the exit status is 1;
silent files are written, with a warning. Audio is converted only on request (--resample,
--downmix). Under torchrun, each rank takes a fixed share of the files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spidr_fast.config import DTYPE_NAMES  # names only: `extract --help` loads no torch
from spidr_fast.extraction.settings import SETTINGS_FILE

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `spidr-fast extract`."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("input", type=Path, help="folder of audio, manifest (.csv/.tsv/.jsonl) or one audio file")
    parser.add_argument("output_dir", type=Path, help="folder to write the outputs to (mirrors the input layout)")
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint .pt (config.json beside it), or spidr_base | dinosr_base_reproduced | dinosr_base_original",
    )
    parser.add_argument(
        "--config",
        type=Path,
        help="the checkpoint's model config (.json, or .toml with a [model] table), when no config.json is beside it",
    )
    parser.add_argument(
        "--layer", type=int, action="append", help="layer to extract, from 1; repeat for several (default: 6)"
    )
    parser.add_argument(
        "--units",
        type=_units_kind,
        metavar="{heads,codebooks,codebook-probs,kmeans:PATH}",
        help="also write units: argmax of the student head of --units-layer (heads), nearest codeword of "
        "its instance-normalised output (codebooks), that head's softmax as 'probs' (codebook-probs, for KL "
        "ABX), or nearest centroid of its features in a file written by `spidr-fast kmeans` (kmeans:PATH)",
    )
    parser.add_argument("--units-layer", type=int, help="layer the units are for (default: the deepest --layer)")
    parser.add_argument(
        "--units-only", action="store_true", help="write units only, no features (for --units-layer, else the --layer)"
    )
    parser.add_argument(
        "--dedup", action="store_true", help="merge runs of a repeated unit: units of the runs + 'durations' (frames)"
    )
    parser.add_argument(
        "--units-format",
        choices=["files", "jsonl"],
        default="files",
        help="jsonl: also OUTPUT_DIR/units.jsonl, a line per file {file, units[, durations]} (default: files)",
    )
    parser.add_argument(
        "--format",
        choices=["npy", "pt"],
        default="npy",
        help="output format (default: npy); pt: the tensor itself when one array is extracted, else a dict",
    )
    parser.add_argument(
        "--flat",
        action="store_true",
        help="name outputs by file id alone (a/b/c.flac -> OUTPUT_DIR/c.npy), as ABX item files do; "
        "files sharing a file id fail",
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda:LOCAL_RANK if available, else cpu)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, help="compute dtype (default: bfloat16 on GPU, else float32)")
    parser.add_argument(
        "--save-dtype", choices=["float32", "float16"], default="float32", help="dtype of saved features"
    )
    parser.add_argument(
        "--max-batch-seconds", type=float, help="padded audio per forward (default: 300 on GPU, 5 on CPU)"
    )
    parser.add_argument(
        "--chunk-seconds", type=float, default=60.0, help="longer files are cut in chunks of this (default: 60)"
    )
    parser.add_argument(
        "--overlap-seconds", type=float, default=5.0, help="context on each side of a chunk (default: 5)"
    )
    parser.add_argument("--resample", action="store_true", help="resample audio that is not 16 kHz (else: failure)")
    parser.add_argument("--downmix", action="store_true", help="average the channels of multi-channel audio")
    parser.add_argument("--after-residual", action="store_true", help="layer outputs instead of FFN outputs")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model (bucketed shapes; for GPUs: no gain measured on CPU)",
    )
    parser.add_argument("--num-workers", type=int, default=4, help="decoding threads (default: 4)")
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads; on the CPU each computes whole batches (default: torch's thread count)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help=f"recompute every output, even when OUTPUT_DIR/{SETTINGS_FILE} records other settings",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _units_kind(value: str) -> str:
    if value in ("heads", "codebooks", "codebook-probs") or (
        value.startswith("kmeans:") and len(value) > len("kmeans:")
    ):
        return value
    raise argparse.ArgumentTypeError(f"invalid choice {value!r} (heads, codebooks, codebook-probs or kmeans:PATH)")


def main(args: argparse.Namespace) -> int:
    """Run the extraction; the exit status is 1 when any file failed."""
    from spidr_fast.checkpoint import DownloadError
    from spidr_fast.extraction.pipeline import run

    try:
        return run(args)
    except (ValueError, OSError, DownloadError) as exc:  # bad arguments, input, checkpoint: no traceback
        print(f"spidr-fast extract: error: {exc}", file=sys.stderr)
        return 2
