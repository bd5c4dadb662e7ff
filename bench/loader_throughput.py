"""Training loader throughput per CPU core: the float path against int16 (PCM16 decoded as int16, standardised
on the device), side by side in one run, on PCM16 WAV and FLAC.

One process, one thread, no DataLoader workers: what one worker core gives. A synthetic LibriSpeech-like
corpus (16 kHz, 2-16 s, speech-like noise at a realistic level) is written in both formats into a temporary
folder; each path then reads the whole epoch through `SpeechDataset` + the reference-recipe `Collator`
(decode, statistics, crop, span masks, stack), `--repeats` times after one warm-up epoch, the two paths'
epochs interleaved (the page cache is warm: decoding, not the disk, is measured). Reported: audio seconds
loaded per second (median of the repeats, and the best; the utterances' full lengths, what the loader
decodes) and the bytes of waveform per audio second that go through shared memory, pinning and the
host-to-device copy. The device-side standardisation (two elementwise kernels on the int16 batch) is not
part of it.

    python bench/loader_throughput.py                  # -> bench/results/loader_throughput.jsonl
    python bench/loader_throughput.py --seconds 120 --repeats 2 --out /tmp/x.jsonl   # quicker
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, append_jsonl, environment

from spidr_fast.config import SAMPLE_RATE, DataConfig
from spidr_fast.data.batching import BucketBatchSampler, Collator
from spidr_fast.data.dataset import SpeechDataset
from spidr_fast.data.manifest import ManifestEntry


def write_corpus(root: Path, seconds: float, fmt: str, seed: int = 0) -> list[ManifestEntry]:
    """PCM16 utterances of 2-16 s, `seconds` in all, as `fmt` ("WAV" or "FLAC")."""
    rng = np.random.default_rng(seed)
    entries, total, i = [], 0, 0
    while total < seconds * SAMPLE_RATE:
        n = int(rng.uniform(2, 16) * SAMPLE_RATE)
        # Band-limited noise with a slow envelope at ~-25 dBFS: FLAC compresses it about as it does speech.
        x = np.convolve(rng.standard_normal(n), np.hanning(8) / 4, mode="same")
        x *= 0.06 * (1 + 0.8 * np.sin(2 * np.pi * rng.uniform(1, 4) * np.arange(n) / SAMPLE_RATE))
        path = root / f"u{i:05d}.{fmt.lower()}"
        sf.write(path, np.clip(x, -1, 1).astype(np.float32), SAMPLE_RATE, subtype="PCM_16", format=fmt)
        entries.append(ManifestEntry(path.stem, str(path), n))
        total, i = total + n, i + 1
    return entries


def epoch_seconds(dataset: SpeechDataset, batches: list[list[tuple[int, int]]], collate: Collator) -> float:
    start = time.perf_counter()
    for keys in batches:
        collate([dataset[k] for k in keys])
    return time.perf_counter() - start


def measure(entries: list[ManifestEntry], repeats: int) -> list[dict[str, Any]]:
    """Both paths on `entries`, their timed epochs interleaved (a load change on the machine hits both)."""
    config = DataConfig(num_buckets=20, max_batch_length=1_400_000, max_sample_size=250_000)
    collate = Collator(config)
    datasets = {path: SpeechDataset(entries, integer=path == "int16") for path in ("float32", "int16")}
    lengths = datasets["float32"].lengths
    batches = [[(i, 1) for i in b] for b in BucketBatchSampler(lengths, config).all_batches(1)]
    audio_s = sum(lengths) / SAMPLE_RATE
    times: dict[str, list[float]] = {path: [] for path in datasets}
    for r in range(repeats + 1):  # the first round warms up: page cache, imports, allocator
        for path, dataset in datasets.items():
            seconds = epoch_seconds(dataset, batches, collate)
            times[path] += [seconds] if r else []
    rows = []
    for path, dataset in datasets.items():
        sample = collate([dataset[k] for k in batches[0]])
        rows.append({
            "path": path,
            "audio_s": audio_s,
            "batches": len(batches),
            "epoch_s": times[path],
            "audio_s_per_s_per_core": audio_s / statistics.median(times[path]),
            "best_audio_s_per_s_per_core": audio_s / min(times[path]),
            "waveform_dtype": str(sample.waveforms.dtype).removeprefix("torch."),
            "waveform_bytes_per_audio_s": sample.waveforms.element_size() * SAMPLE_RATE,
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=600.0, help="audio per format")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per path (median)")
    parser.add_argument("--formats", nargs="+", default=["WAV", "FLAC"], choices=["WAV", "FLAC"])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "loader_throughput.jsonl")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    env = environment(torch.device("cpu"))
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in args.formats:
            folder = Path(tmp) / fmt
            folder.mkdir()
            entries = write_corpus(folder, args.seconds, fmt)
            rows = measure(entries, args.repeats)
            speedup = rows[1]["audio_s_per_s_per_core"] / rows[0]["audio_s_per_s_per_core"]
            command = "python bench/loader_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)
            base = rows[0]["audio_s_per_s_per_core"]
            records += [
                {**env, "benchmark": "loader_throughput", "format": f"PCM16 {fmt}", **row,
                 "speedup_vs_float32": row["audio_s_per_s_per_core"] / base, "command": command}
                for row in rows
            ]  # fmt: skip
            print(f"PCM16 {fmt}: float32 {rows[0]['audio_s_per_s_per_core']:,.0f} audio-s/s per core, "
                  f"int16 {rows[1]['audio_s_per_s_per_core']:,.0f} ({speedup:.2f}x); waveform bytes per audio-s "
                  f"{rows[0]['waveform_bytes_per_audio_s']} -> {rows[1]['waveform_bytes_per_audio_s']}")  # fmt: skip
    append_jsonl(args.out, records)
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
