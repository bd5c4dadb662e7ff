"""Extraction throughput: spidr_fast's `FeatureExtractor` side by side with the reference `spidr` package.

Same weights (the reference model is built first, its state dict loaded into spidr_fast), same
waveforms (LibriSpeech-like lengths, 2-35 s), same process, runs interleaved round by round
(best round kept) so that load from other processes hits both alike. The reference is run as a
user of its API would: `get_intermediate_outputs(waveforms, attention_mask=...)[layer - 1]`
either one utterance at a time (no padding) or in padded batches of B utterances in corpus
order with its (B, 1, T, T) mask. spidr_fast runs `FeatureExtractor(layers=[layer])` with a
sweep of `max_batch_seconds`. Every spidr_fast output is checked against the reference's
one-utterance output (max abs error reported). Results are appended as JSON lines to
bench/results/extract_throughput.jsonl with the device, torch version and git commit.

Other experiments (`--experiment`):
- `chunking`: chunked vs whole-file extraction of one long file (relative error per frame).
- `dtype`: bf16 / fp16 vs fp32 features (relative error; CPU autocast runs bf16 only).

    python bench/extract_throughput.py --smoke                         # CPU, tiny config, < 1 min
    python bench/extract_throughput.py --config base --num-utts 16     # base config (random weights)
    python bench/extract_throughput.py --experiment chunking --config base
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, append_jsonl, environment, require_reference, synchronize

import spidr_fast
from spidr_fast.checkpoint import load_state_dict_strict
from spidr_fast.data.batching import librispeech_like_lengths, num_frames
from spidr_fast.extraction import FeatureExtractor, standardize
from spidr_fast.models.padding import attention_mask_from_lengths

TINY = {
    "extractor_conv_layer_config": [(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2,
    "encoder_embed_dim": 64,
    "encoder_num_heads": 4,
    "encoder_num_layers": 4,
    "encoder_ff_interm_features": 128,
    "encoder_pos_conv_kernel": 15,
    "encoder_pos_conv_groups": 4,
    "codebook_size": 16,
    "num_codebooks": 2,
}


def models(config: str, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(reference SpidR, spidr_fast SpidR) with the same weights, eval mode."""
    require_reference()
    from spidr.config import SpidRConfig as RefConfig
    from spidr.models import SpidR as RefSpidR

    fields = TINY if config == "tiny" else {}
    torch.manual_seed(0)
    ref = RefSpidR(RefConfig(**fields)).eval().to(device)
    ours = spidr_fast.SpidR(spidr_fast.SpidRConfig(**fields))
    load_state_dict_strict(ours, {k: v.cpu() for k, v in ref.state_dict().items()}, "reference")
    return ref, ours.eval().to(device)


def reference_run(ref: torch.nn.Module, waves: list[torch.Tensor], layer: int, batch: int) -> list[torch.Tensor]:
    """The reference API: batches of `batch` utterances in corpus order, zero-padded, with its mask."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(waves), batch):
            group = waves[i : i + batch]
            if len(group) == 1:
                out.append(ref.get_intermediate_outputs(group[0][None])[layer - 1][0])
                continue
            width = max(w.numel() for w in group)
            x = torch.stack([torch.nn.functional.pad(w, (0, width - w.numel())) for w in group])
            frames = torch.from_numpy(num_frames([w.numel() for w in group])).to(x.device)
            mask = attention_mask_from_lengths(frames, int(num_frames(width)))
            y = ref.get_intermediate_outputs(x, attention_mask=mask)[layer - 1]
            out += [y[j, :n] for j, n in enumerate(frames.tolist())]
    return out


def timed(fn: Any, device: torch.device) -> tuple[float, Any]:
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def throughput(args: argparse.Namespace, device: torch.device) -> list[dict]:
    ref, ours = models(args.config, device)
    lengths = librispeech_like_lengths(args.num_utts, seed=0)
    if args.max_seconds:
        lengths = np.minimum(lengths, int(args.max_seconds * 16_000))
    rng = np.random.default_rng(0)
    waves = [standardize(0.1 * rng.standard_normal(n)).to(device) for n in lengths]
    audio = float(lengths.sum()) / 16_000
    runs: dict[str, Any] = {
        f"reference batch={b}": (lambda b=b: reference_run(ref, waves, args.layer, b)) for b in args.ref_batches
    }
    for seconds in args.batch_seconds:
        extractor = FeatureExtractor(
            ours, layers=[args.layer], device=device, dtype="float32", max_batch_seconds=seconds
        )
        runs[f"spidr_fast max_batch_seconds={seconds:g}"] = lambda e=extractor: [
            r[f"layer{args.layer}"] for r in e(waves)
        ]
    best = {name: float("inf") for name in runs}
    errors: dict[str, float] = {}
    expected = None
    for round_ in range(args.repeats + 1):  # round 0 warms up and checks outputs
        for name, fn in runs.items():
            wall, outputs = timed(fn, device)
            if round_ == 0:
                if expected is None and name == "reference batch=1":
                    expected = [o.cpu() for o in outputs]
                if expected is not None:
                    errors[name] = max((o.cpu() - e).abs().max().item() for o, e in zip(outputs, expected))
                continue
            best[name] = min(best[name], wall)
    ref_single = best.get("reference batch=1", float("nan"))
    ref_best = min(v for k, v in best.items() if k.startswith("reference"))
    env = environment(device)
    records = []
    for name, wall in best.items():
        records.append(
            {
                "benchmark": "extract_throughput",
                "impl": name,
                "config": args.config,
                "layer": args.layer,
                "num_utts": args.num_utts,
                "audio_seconds": round(audio, 2),
                "wall_seconds": round(wall, 4),
                "audio_seconds_per_second": round(audio / wall, 2),
                "speedup_vs_reference_single": round(ref_single / wall, 3),
                "speedup_vs_reference_best": round(ref_best / wall, 3),
                "max_abs_error_vs_reference_single": errors.get(name),
                "repeats": args.repeats,
                **env,
            }
        )
    return records


def chunking(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Chunked vs whole-file features of one long file, per chunk/overlap setting."""
    _, ours = models(args.config, device)
    rng = np.random.default_rng(0)
    wave = standardize(0.1 * rng.standard_normal(int(args.long_seconds * 16_000)))
    whole = FeatureExtractor(ours, layers=[args.layer], device=device, chunk_seconds=1e9)([wave])[0][
        f"layer{args.layer}"
    ]
    records = []
    for chunk, overlap in args.chunk_settings:
        extractor = FeatureExtractor(
            ours, layers=[args.layer], device=device, chunk_seconds=chunk, overlap_seconds=overlap
        )
        got = extractor([wave])[0][f"layer{args.layer}"]
        rel = ((got - whole).norm(dim=-1) / whole.norm(dim=-1).clamp_min(1e-12)).numpy()
        records.append(
            {
                "benchmark": "extract_chunking",
                "config": args.config,
                "layer": args.layer,
                "file_seconds": args.long_seconds,
                "chunk_seconds": chunk,
                "overlap_seconds": overlap,
                "rel_error_mean": float(rel.mean()),
                "rel_error_p99": float(np.quantile(rel, 0.99)),
                "rel_error_max": float(rel.max()),
                **environment(device),
            }
        )
    return records


def dtypes(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Low-precision vs fp32 features (relative Frobenius error per utterance, max over utterances)."""
    reference, ours = models(args.config, device)
    rng = np.random.default_rng(0)
    waves = [standardize(0.1 * rng.standard_normal(n)) for n in librispeech_like_lengths(args.num_utts, seed=1)]
    ref = FeatureExtractor(ours, layers=[args.layer], device=device)(waves)
    records = []
    key = f"layer{args.layer}"
    for name in ("bfloat16", "float16"):
        got = FeatureExtractor(ours, layers=[args.layer], device=device, dtype=name)(waves)
        rel = [((g[key] - r[key]).norm() / r[key].norm()).item() for g, r in zip(got, ref)]
        # The same autocast on the reference, one utterance at a time: PyTorch's own low-precision error.
        with torch.inference_mode(), torch.autocast(device.type, dtype=getattr(torch, name)):
            ref_low = [
                reference.get_intermediate_outputs(w[None].to(device))[args.layer - 1][0].float().cpu() for w in waves
            ]
        ref_rel = [((g - r[key]).norm() / r[key].norm()).item() for g, r in zip(ref_low, ref)]
        abs_err = max((g[key] - r[key]).abs().max().item() for g, r in zip(got, ref))
        records.append(
            {
                "benchmark": "extract_dtype",
                "dtype": name,
                "config": args.config,
                "layer": args.layer,
                "rel_error_max": max(rel),
                "rel_error_mean": float(np.mean(rel)),
                "reference_same_dtype_rel_error_max": max(ref_rel),
                "abs_error_max": abs_err,
                "feature_abs_max": max(r[key].abs().max().item() for r in ref),
                **environment(device),
            }
        )
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", choices=["throughput", "chunking", "dtype"], default="throughput")
    parser.add_argument("--smoke", action="store_true", help="tiny config, short files: a CPU check in < 1 min")
    parser.add_argument("--config", choices=["base", "tiny"], default="base")
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--num-utts", type=int, default=16)
    parser.add_argument("--max-seconds", type=float, help="cap utterance lengths (seconds)")
    parser.add_argument(
        "--batch-seconds",
        type=float,
        nargs="+",
        help="max_batch_seconds to sweep (default: 20 60 200 on GPU, 5 20 on CPU)",
    )
    parser.add_argument("--ref-batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--long-seconds", type=float, default=180.0)
    parser.add_argument(
        "--chunk-settings",
        type=lambda s: tuple(map(float, s.split(":"))),
        nargs="+",
        default=[(60.0, 5.0), (30.0, 5.0), (20.0, 2.0), (60.0, 0.0)],
        help="chunk:overlap seconds",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "extract_throughput.jsonl")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.config, args.layer, args.num_utts, args.max_seconds = "tiny", 3, 8, 4.0
        args.batch_seconds, args.ref_batches, args.repeats, args.long_seconds = [4.0, 16.0], [1, 4], 1, 30.0
        args.chunk_settings = [(5.0, 1.0)]
    device = torch.device(args.device)
    if args.batch_seconds is None:
        args.batch_seconds = [20.0, 60.0, 200.0] if device.type == "cuda" else [5.0, 20.0]
    records = {"throughput": throughput, "chunking": chunking, "dtype": dtypes}[args.experiment](args, device)
    append_jsonl(args.out, records)
    for r in records:
        print({k: v for k, v in r.items() if k not in ("date", "python", "triton", "cuda", "gpu_count")})


if __name__ == "__main__":
    main()
