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
- `units`: features alone vs the same extraction with `units=KMeans` (K = `--k`, fitted in a few
  Lloyd iterations on the run's own features) and with `units="heads"`: the overhead ratio of each
  (issue 14: k-means units should cost no more than 5% over features alone).

    python bench/extract_throughput.py --smoke                         # CPU, tiny config, < 1 min
    python bench/extract_throughput.py --config base --num-utts 16     # base config (random weights)
    python bench/extract_throughput.py --experiment chunking --config base
    python bench/extract_throughput.py --experiment units --config base --num-utts 8 --threads 2
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
from common import RESULTS_DIR, append_jsonl, environment, librispeech_like_lengths, require_reference, synchronize

import spidr_fast
from spidr_fast.checkpoint import load_state_dict_strict
from spidr_fast.config import SAMPLE_RATE
from spidr_fast.data.audio import standardize
from spidr_fast.extraction import FeatureExtractor
from spidr_fast.framing import num_frames
from spidr_fast.models.padding import attention_mask_from_lengths
from spidr_fast.train.config import preset_model_fields

TINY = preset_model_fields("tiny", encoder_num_layers=3)  # --smoke reads layer 3


def reference_available() -> bool:
    try:
        import spidr  # noqa: F401
    except ImportError:
        return False
    return True


def models(config: str, device: torch.device, need_reference: bool = True) -> tuple[Any, torch.nn.Module]:
    """(reference SpidR, spidr_fast SpidR) with the same weights, eval mode. Without the reference
    package and `need_reference=False`: (None, spidr_fast SpidR with seeded random weights)."""
    fields = TINY if config == "tiny" else {}
    torch.manual_seed(0)
    ours = spidr_fast.SpidR(spidr_fast.SpidRConfig(**fields))
    if not need_reference and not reference_available():
        return None, ours.eval().to(device)
    require_reference()
    from spidr.config import SpidRConfig as RefConfig
    from spidr.models import SpidR as RefSpidR

    torch.manual_seed(0)
    ref = RefSpidR(RefConfig(**fields)).eval().to(device)
    load_state_dict_strict(ours, {k: v.cpu() for k, v in ref.state_dict().items()}, "reference")
    return ref, ours.eval().to(device)


def reference_run(
    ref: torch.nn.Module, waves: list[torch.Tensor], layers: list[int], batch: int, dtype: torch.dtype
) -> list[list[torch.Tensor]]:
    """The reference API: batches of `batch` utterances in corpus order, zero-padded, with its mask;
    per utterance the outputs of `layers` (autocast to `dtype` unless fp32)."""
    out = []
    with torch.inference_mode(), torch.autocast(waves[0].device.type, dtype=dtype, enabled=dtype != torch.float32):
        for i in range(0, len(waves), batch):
            group = waves[i : i + batch]
            if len(group) == 1:
                ys = ref.get_intermediate_outputs(group[0][None])
                out.append([ys[layer - 1][0] for layer in layers])
                continue
            width = max(w.numel() for w in group)
            x = torch.stack([torch.nn.functional.pad(w, (0, width - w.numel())) for w in group])
            frames = torch.from_numpy(num_frames([w.numel() for w in group])).to(x.device)
            mask = attention_mask_from_lengths(frames, int(num_frames(width)))
            ys = ref.get_intermediate_outputs(x, attention_mask=mask)
            out += [[ys[layer - 1][j, :n] for layer in layers] for j, n in enumerate(frames.tolist())]
    return out


def timed(fn: Any, device: torch.device) -> tuple[float, Any]:
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def layer_list(spec: str, num_layers: int) -> list[int]:
    """ "6" -> [6]; "all" -> every layer; "1,6,12" -> those."""
    if spec == "all":
        return list(range(1, num_layers + 1))
    try:
        return [int(v) for v in spec.split(",")]
    except ValueError:
        raise SystemExit(f"--layers: {spec!r} is not a layer number, a comma-separated list or 'all'") from None


def waveforms(args: argparse.Namespace, device: torch.device) -> tuple[list[torch.Tensor], float]:
    """`--num-utts` LibriSpeech-like noise waveforms (capped at `--max-seconds`), their total seconds."""
    lengths = librispeech_like_lengths(args.num_utts, seed=0)
    if args.max_seconds:
        lengths = np.minimum(lengths, int(args.max_seconds * SAMPLE_RATE))
    rng = np.random.default_rng(0)
    waves = [torch.from_numpy(standardize(0.1 * rng.standard_normal(n))).to(device) for n in lengths]
    return waves, float(lengths.sum()) / SAMPLE_RATE


def best_rounds(runs: dict[str, Any], repeats: int, device: torch.device) -> tuple[dict[str, float], dict[str, Any]]:
    """Interleaved rounds: round 0 warms up and keeps each run's outputs; then the best of `repeats`."""
    best = {name: float("inf") for name in runs}
    first: dict[str, Any] = {}
    for round_ in range(repeats + 1):
        for name, fn in runs.items():
            wall, outputs = timed(fn, device)
            if round_ == 0:
                first[name] = outputs
            else:
                best[name] = min(best[name], wall)
    return best, first


def throughput(args: argparse.Namespace, device: torch.device) -> list[dict]:
    ref, ours = models(args.config, device, need_reference=not args.no_reference)
    waves, audio = waveforms(args, device)
    records = []
    for spec in args.layers:
        layers = layer_list(spec, len(ours.student.layers))
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            records += throughput_one(args, device, ref, ours, waves, audio, layers, spec, dtype_name, dtype)
    return records


def throughput_one(args, device, ref, ours, waves, audio, layers, spec, dtype_name, dtype) -> list[dict]:
    runs: dict[str, Any] = {}
    if ref is not None:
        for b in args.ref_batches:
            runs[f"reference batch={b}"] = lambda b=b: reference_run(ref, waves, layers, b, dtype)
    for seconds in args.batch_seconds:
        extractor = FeatureExtractor(ours, layers=layers, device=device, dtype=dtype_name, max_batch_seconds=seconds)
        name = "spidr_fast batch=1" if seconds < 1 else f"spidr_fast max_batch_seconds={seconds:g}"
        runs[name] = lambda e=extractor: [[r[f"layer{layer}"] for layer in layers] for r in e(waves)]
    best, first = best_rounds(runs, args.repeats, device)
    # Every output against the first run's (the reference one at a time, when there).
    expected = [[y.float().cpu() for y in o] for o in next(iter(first.values()))]
    errors = {
        name: max((a.float().cpu() - e).abs().max().item() for o, eo in zip(outs, expected) for a, e in zip(o, eo))
        for name, outs in first.items()
    }
    baseline = next(iter(runs))
    ref_single = best[baseline] if baseline.startswith("reference") else float("nan")
    ref_times = [v for k, v in best.items() if k.startswith("reference")]
    ref_best = min(ref_times) if ref_times else float("nan")
    env = environment(device)
    records = []
    for name, wall in best.items():
        records.append(
            {
                "benchmark": "extract_throughput",
                "impl": name,
                "config": args.config,
                "layer": layers[0] if len(layers) == 1 else spec,
                "dtype": dtype_name,
                "num_utts": args.num_utts,
                "audio_seconds": round(audio, 2),
                "wall_seconds": round(wall, 4),
                "audio_seconds_per_second": round(audio / wall, 2),
                "speedup_vs_reference_single": round(ref_single / wall, 3) if ref is not None else None,
                "speedup_vs_reference_best": round(ref_best / wall, 3) if ref is not None else None,
                "max_abs_error_vs_reference_single": errors.get(name) if ref is not None else None,
                "reference": "none (not installed)" if ref is None else None,
                "repeats": args.repeats,
                **env,
            }
        )
    append_jsonl(args.out, records)  # per configuration: a later one that times out loses nothing
    return records


def chunking(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Chunked vs whole-file features of one long file, per chunk/overlap setting."""
    _, ours = models(args.config, device)
    rng = np.random.default_rng(0)
    wave = torch.from_numpy(standardize(0.1 * rng.standard_normal(int(args.long_seconds * SAMPLE_RATE))))
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
    waves = [
        torch.from_numpy(standardize(0.1 * rng.standard_normal(n)))
        for n in librispeech_like_lengths(args.num_utts, seed=1)
    ]
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


def units(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Features alone vs features + k-means units vs features + head units, same pass, same waveforms."""
    from spidr_fast.units import KMeans

    _, ours = models(args.config, device, need_reference=False)
    waves, audio = waveforms(args, device)
    layer, key = args.layer, f"layer{args.layer}"
    common = {"layers": [layer], "device": device, "max_batch_seconds": args.batch_seconds[0]}
    features = FeatureExtractor(ours, **common)
    frames = torch.cat([r[key] for r in features(waves)])
    if frames.shape[0] < args.k:
        raise SystemExit(f"--k {args.k}: the waveforms give only {frames.shape[0]} frames; raise --num-utts")
    # A quick fit: K frames as initial centroids, a few Lloyd iterations on (a subsample of) the frames.
    init = frames[torch.randperm(frames.shape[0], generator=torch.Generator().manual_seed(0))[: args.k]]
    kmeans = KMeans(args.k, iters=args.kmeans_iters, init=init, device=device, max_frames=50_000).fit(frames)
    runs = {
        "features": features,
        "features+kmeans": FeatureExtractor(ours, units=kmeans, **common),
        "features+heads": FeatureExtractor(ours, units="heads", **common),
    }
    best, first = best_rounds({name: lambda e=e: e(waves) for name, e in runs.items()}, args.repeats, device)
    for name, outputs in first.items():  # units change nothing in the features, and give one per frame
        for got, ref in zip(outputs, first["features"]):
            if not torch.equal(got[key], ref[key]):
                raise AssertionError(f"{name}: its layer {layer} features differ from features alone")
            if name != "features" and got["units"].shape != ref[key].shape[:1]:
                raise AssertionError(
                    f"{name}: units of shape {tuple(got['units'].shape)} for {ref[key].shape[0]} frames"
                )
    env = environment(device)
    return [
        {
            "benchmark": "extract_units",
            "impl": name,
            "config": args.config,
            "layer": layer,
            "k": args.k if name == "features+kmeans" else None,
            "num_utts": args.num_utts,
            "audio_seconds": round(audio, 2),
            "max_batch_seconds": args.batch_seconds[0],
            "wall_seconds": round(wall, 4),
            "audio_seconds_per_second": round(audio / wall, 2),
            "overhead_vs_features": round(wall / best["features"], 4),
            "repeats": args.repeats,
            **env,
        }
        for name, wall in best.items()
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", choices=["throughput", "chunking", "dtype", "units"], default="throughput")
    parser.add_argument("--smoke", action="store_true", help="tiny config, short files: a CPU check in < 1 min")
    parser.add_argument("--config", choices=["base", "tiny"], default="base")
    parser.add_argument("--layer", type=int, default=6, help="layer of the chunking and dtype experiments")
    parser.add_argument(
        "--layers",
        nargs="+",
        default=None,
        help="throughput: layer sets, each '6', '1,6,12' or 'all' (default: --layer)",
    )
    parser.add_argument(
        "--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16", "float16"], help="throughput"
    )
    parser.add_argument("--no-reference", action="store_true", help="throughput without the reference package")
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
    parser.add_argument("--k", type=int, default=500, help="units: k-means centroids")
    parser.add_argument("--kmeans-iters", type=int, default=3, help="units: Lloyd iterations of the quick fit")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "extract_throughput.jsonl")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.config, args.layer, args.num_utts, args.max_seconds = "tiny", 3, min(args.num_utts, 8), 4.0
        args.batch_seconds = args.batch_seconds or [4.0, 16.0]
        args.ref_batches, args.repeats, args.long_seconds = [1, 4], 1, 30.0
        args.chunk_settings = [(5.0, 1.0)]
        args.k = min(args.k, 64)
    device = torch.device(args.device)
    if args.batch_seconds is None:
        args.batch_seconds = [20.0, 60.0, 200.0] if device.type == "cuda" else [5.0, 20.0]
    args.layers = args.layers or [str(args.layer)]
    records = {"throughput": throughput, "chunking": chunking, "dtype": dtypes, "units": units}[args.experiment](
        args, device
    )
    if args.experiment != "throughput":  # throughput appends per configuration as it goes
        append_jsonl(args.out, records)
    for r in records:
        print({k: v for k, v in r.items() if k not in ("date", "python", "triton", "cuda", "gpu_count")})


if __name__ == "__main__":
    main()
