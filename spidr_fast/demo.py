"""The main job on built-in defaults: pretrain a small SpidR on a synthetic corpus and show it learn.

Steps: generate the built-in corpus (synthetic speech with phone alignments, no network), pretrain
a small SpidR (`configs/demo.toml`) for a few minutes on the CPU, then extract units on held-out
utterances and print their PNMI and phone purity for the trained model next to the same architecture
at initialisation, with the loss, the codebook perplexities and the throughput. Two kinds of units:

- "head argmax": the argmax of each prediction head (the model's own units, `get_codebooks`), best head;
- "k-means on layer L": k-means (K=32, fitted on training utterances) of the student's layer outputs,
  best layer; the usual probe of what a representation encodes, and fair to a random init (whose
  heads' argmax is mostly decided by their biases).

The best head / layer is picked by PNMI on the held-out set itself, for both models alike. And, for
scale, the same k-means on a log power spectrum (no learning at all).

Why `demo.toml` and not `tiny.toml` (measured; the numbers are in the config's comments): the
teacher reads the student's own features, and tiny's layer_norm extractor, at random init, keeps
almost no phone information, so there is nothing to bootstrap from; training then shrinks the
features until the 32-dim teacher's outputs (whose variation over time is at the scale of the
instance norm's eps) are near-constant and the targets collapse onto the codewords nearest zero.
`demo.toml` is tiny with the group_norm extractor (wav2vec 2.0 base style), which avoids both, and a
schedule for a few thousand short steps.

The demo trains on one torch thread by default: on a small CPU shared with other processes, two
threads made each step ~6x slower (OpenMP threads waiting on each other's cores). Training shows a
progress bar (the trainer's `progress` hook: tqdm on stderr, refreshed every 30 s when stderr is not
a terminal). The results open with the verdict (trained vs random-init PNMI, both kinds of units),
then the table, and warn when the target codebooks look collapsed, so a run cut short by a slow
machine says so. It ends with the units report (`spidr-fast units-report`'s rows: PNMI, purities,
perplexity, active units, bitrate, mean run length) of the codebook and k-means units, random init
and trained side by side. Layers are numbered from 1, as `spidr-fast extract --layer` numbers them.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

if TYPE_CHECKING:  # torch and the library are imported where they are used: `demo --help` loads no torch
    import torch

    from spidr_fast.data.dataset import SpeechDataset
    from spidr_fast.units import KMeans

KMEANS_K = 32
KMEANS_FIT_UTTERANCES = 48  # training utterances the k-means is fitted on


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default=None, help="where the corpus and run go (default: a temp folder)")
    parser.add_argument("--minutes", type=float, default=3.5, help="training time budget (wall clock)")
    parser.add_argument("--max-steps", type=int, default=None, help="step cap (default: the config's max_steps)")
    parser.add_argument("--utterances", type=int, default=160, help="synthetic utterances (1 in 5 held out)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a small shared CPU, more threads than free cores make "
        "every step many times slower)",
    )
    parser.add_argument("--config", default="demo", help="training config (a shipped preset name or a TOML path)")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value", help="on top of the config")


class _Bar(tqdm):
    """The trainer's bar, redrawn only on its own clock (`mininterval`), not at every metrics update."""

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        super().set_postfix(ordered_dict, refresh=False, **kwargs)


# ---------------------------------------------------------------- units
def _kmeans_fit(x: torch.Tensor, k: int, iters: int = 25, seed: int = 0) -> KMeans:
    """k-means of `x` (N, D) with `spidr_fast.units.KMeans` (k-means++ seeding, then Lloyd iterations)."""
    from spidr_fast.units import KMeans

    return KMeans(k, iters=iters, seed=seed, device="cpu").fit(x)


def _layer_outputs(model: torch.nn.Module, dataset: SpeechDataset, limit: int | None = None) -> dict[str, list]:
    """fileid -> the student's layer outputs (after the residual), one (T, D) tensor per layer."""
    import torch

    out = {}
    for i in range(len(dataset) if limit is None else min(limit, len(dataset))):
        item = dataset[i]
        if item.waveform is not None:
            with torch.no_grad():
                layers = model.get_intermediate_outputs(item.waveform[None], before_residual=False)
            out[dataset.entries[i].fileid] = [y[0] for y in layers]
    return out


def _log_spectrum(waveform: torch.Tensor) -> torch.Tensor:
    """(T, 40) log band energies of 25 ms Hann windows every 20 ms, on the model's frame grid."""
    import torch

    frames = waveform.unfold(0, 400, 320)
    power = torch.fft.rfft(frames * torch.hann_window(400), dim=-1).abs().square()[:, 1:]  # 200 bins
    return (power.reshape(power.shape[0], 40, 5).sum(-1) + 1e-6).log()


def _kmeans_units(fit: dict[str, torch.Tensor], apply: dict[str, torch.Tensor], alignments: dict) -> dict[str, float]:
    import torch

    from spidr_fast.metrics import unit_metrics

    x = torch.cat(list(fit.values()))
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)  # standardise: k-means then weighs every channel alike
    kmeans = _kmeans_fit((x - mean) / std, KMEANS_K)
    units = {k: kmeans.predict((v - mean) / std).numpy() for k, v in apply.items()}
    m = unit_metrics(units, alignments)
    return {"pnmi": m.pnmi, "phone_purity": m.phone_purity, "unit_ppl": m.perplexity, "metrics": m}


def _units_report(
    model: torch.nn.Module, train: SpeechDataset, dev: SpeechDataset, alignments: dict
) -> dict[str, Any]:
    import torch

    from spidr_fast.train.validate import extract_units, heads_quality

    model = model.eval()
    heads, head_metrics = heads_quality(extract_units(model, dev, torch.device("cpu"), torch.float32), alignments)
    fit, apply = _layer_outputs(model, train, KMEANS_FIT_UTTERANCES), _layer_outputs(model, dev)
    layers = [
        _kmeans_units({k: v[layer] for k, v in fit.items()}, {k: v[layer] for k, v in apply.items()}, alignments)
        for layer in range(len(next(iter(apply.values()))))
    ]
    best = max(range(len(layers)), key=lambda i: layers[i]["pnmi"])
    return {
        "heads": heads,
        "head_metrics": head_metrics[heads["best_head"]],
        "kmeans": layers[best],
        "kmeans_layer": best,
    }


def _target_codewords_used(model: torch.nn.Module, dev: SpeechDataset) -> list[tuple[int, float]]:
    """Per codebook: how many codewords win at least one teacher target on the dev set, and the
    perplexity of those assignments. The targets and their codewords are the training objective's own
    (`kernels.instance_norm_targets`, `Codebooks.assign`), on every frame; the codebooks are not updated."""
    import torch

    from spidr_fast import kernels
    from spidr_fast.models.codebook import perplexity

    counts = torch.zeros(model.num_codebooks, model.codebooks.size)
    for i in range(len(dev)):
        item = dev[i]
        if item.waveform is None:
            continue
        with torch.no_grad():
            features = model.feature_projection(model.feature_extractor(item.waveform[None], None))
            layers = model.teacher.get_intermediate_outputs(features, None)[-model.num_codebooks :]
            every_frame = torch.arange(features.shape[1])[None]
            _, batch_counts, _ = model.codebooks.assign(kernels.instance_norm_targets(layers, None, every_frame))
        counts += batch_counts
    ppl = perplexity(counts, counts.sum(-1, keepdim=True))
    return [(int((n > 0).sum()), float(p)) for n, p in zip(counts, ppl, strict=True)]


def main(args: argparse.Namespace) -> int:
    import torch

    from spidr_fast import load_model
    from spidr_fast.checkpoint import build_model
    from spidr_fast.data.corpus import generate_corpus, read_alignments
    from spidr_fast.data.dataset import SpeechDataset
    from spidr_fast.data.manifest import read_manifest, write_manifest
    from spidr_fast.train.checkpoint import find_checkpoints
    from spidr_fast.train.config import read_config
    from spidr_fast.train.export import export
    from spidr_fast.train.trainer import train

    t0 = time.monotonic()
    torch.set_num_threads(max(1, args.threads))
    root = Path(args.workdir or tempfile.mkdtemp(prefix="spidr_fast_demo_"))
    print(f"[1/4] generating {args.utterances} synthetic utterances in {root / 'corpus'}", flush=True)
    corpus = generate_corpus(root / "corpus", num_utterances=args.utterances, seed=0)
    entries = read_manifest(corpus / "manifest.csv")
    dev_entries = entries[::5]
    train_entries = [e for i, e in enumerate(entries) if i % 5]
    write_manifest(train_entries, root / "train.csv")
    write_manifest(dev_entries, root / "dev.csv")
    alignments_path = corpus / "alignments.jsonl"
    alignments = read_alignments(alignments_path)

    overrides = [
        f"data.manifest={root / 'train.csv'}",
        f"run.workdir={root / 'runs'}",
        f"run.max_time_s={args.minutes * 60}",
        *([f"optimizer.max_steps={args.max_steps}"] if args.max_steps else []),
        *args.overrides,
    ]
    cfg = read_config(args.config, overrides)
    train_set, dev = SpeechDataset(root / "train.csv"), SpeechDataset(root / "dev.csv")
    torch.manual_seed(cfg.run.random_seed)
    random_init = build_model(cfg.model)
    initial = _units_report(random_init, train_set, dev, alignments)
    initial_used = _target_codewords_used(random_init, dev)

    steps = cfg.optimizer.max_steps
    print(
        f"[2/4] pretraining a small SpidR ({args.config}) for up to {steps} steps or {args.minutes:g} min", flush=True
    )
    print(f"      run folder {cfg.run.dir}", flush=True)
    # A bar on stderr; in a log file (not a terminal) it is rewritten only every 30 s.
    bar = functools.partial(_Bar, mininterval=0.5 if sys.stderr.isatty() else 30, unit="step", file=sys.stderr)
    t_train = time.monotonic()
    train(cfg, progress=bar)
    t_train = time.monotonic() - t_train
    log = [json.loads(line) for line in (cfg.run.dir / "train_log.jsonl").read_text().splitlines()]
    train_log = [r for r in log if r["split"] == "train"]
    first, last = train_log[0], train_log[-1]

    print("[3/4] exporting the final checkpoint and extracting units on held-out utterances", flush=True)
    exported = export(find_checkpoints(cfg.run.dir / "checkpoints")[-1], cfg.run.dir / "spidr_demo.pt")
    model = load_model(exported)
    trained = _units_report(model, train_set, dev, alignments)
    trained_used = _target_codewords_used(model, dev)
    spectrum = _kmeans_units(
        {
            e.fileid: _log_spectrum(train_set[i].waveform)
            for i, e in enumerate(train_set.entries[:KMEANS_FIT_UTTERANCES])
        },
        {e.fileid: _log_spectrum(dev[i].waveform) for i, e in enumerate(dev.entries)},
        alignments,
    )

    size = cfg.model.codebook_size
    first_head_layer = cfg.model.encoder_num_layers - cfg.model.num_codebooks + 1  # head h: layer first + h
    head_a, head_b = initial["heads"], trained["heads"]
    rows = [  # (units, which head / layer: random init / trained, unit ppl, metrics at init, trained)
        (
            "head argmax",
            f"best of {cfg.model.num_codebooks} heads: layer {first_head_layer + head_a['best_head']}"
            f" / {first_head_layer + head_b['best_head']}",
            [head_a[f"head{head_a['best_head']}_unit_ppl"], head_b[f"head{head_b['best_head']}_unit_ppl"]],
            head_a,
            head_b,
        ),
        (
            f"k-means {KMEANS_K} on a layer",
            f"best layer: {initial['kmeans_layer'] + 1} / {trained['kmeans_layer'] + 1}",
            [initial["kmeans"]["unit_ppl"], trained["kmeans"]["unit_ppl"]],
            initial["kmeans"],
            trained["kmeans"],
        ),
    ]
    gains = [b["pnmi"] > a["pnmi"] for *_, a, b in rows]
    worst_used, worst_ppl = min(n for n, _ in trained_used), min(p for _, p in trained_used)

    # ---- the result first, then the details
    print("[4/4] results")
    print("=" * 78)
    if all(gains):
        print("RESULT: trained units carry more phone information than at random init")
    else:
        failed = ", ".join(row[0] for row, gain in zip(rows, gains, strict=True) if not gain)
        print(
            f"RESULT: NO gain over the random init for {failed} after {last['step']} steps"
            " (too few for this machine's speed? see --minutes / --max-steps)"
        )
    for name, which, _, a, b in rows:
        print(f"  PNMI, {name:22s} {a['pnmi']:.3f} -> {b['pnmi']:.3f} ({b['pnmi'] - a['pnmi']:+.3f}; {which})")
    if worst_used <= size // 2 or min(worst_ppl, last["target_ppl"]) < size / 3:
        print("  warning: the target codebooks are collapsing (few codewords in use / low target perplexity)")
    print("=" * 78)
    print(f"  steps {last['step']} in {t_train:.0f} s (epochs {last['epoch']}), {len(dev)} held-out utterances")
    print(f"  loss             {first['loss']:.3f} (step {first['step']}) -> {last['loss']:.3f} (step {last['step']})")
    print(f"  target ppl       {first['target_ppl']:.2f} -> {last['target_ppl']:.2f} (of {size} codewords, training)")
    print(f"  predicted ppl    {first['pred_ppl']:.2f} -> {last['pred_ppl']:.2f}")
    used = lambda u: ", ".join(f"{n}/{size} (ppl {p:.1f})" for n, p in u)
    print(f"  codewords in use {used(initial_used)} -> {used(trained_used)} (teacher targets, held-out audio)")
    print(f"  throughput       {last['audio_s_per_s']:.1f} audio s/s, {last['frames_per_s']:.0f} frames/s")
    print(f"  {'units (held-out)':34s} {'random init':>12s} {'trained':>10s}")
    for name, which, ppl, a, b in rows:
        print(f"  {name} ({which})")
        print(f"    {'unit ppl':30s} {ppl[0]:12.2f} {ppl[1]:10.2f}")
        print(f"    {'PNMI':30s} {a['pnmi']:12.3f} {b['pnmi']:10.3f}")
        print(f"    {'phone purity':30s} {a['phone_purity']:12.3f} {b['phone_purity']:10.3f}")
    print(
        f"  for scale: k-means {KMEANS_K} on a log spectrum (no learning): PNMI {spectrum['pnmi']:.3f}, "
        f"phone purity {spectrum['phone_purity']:.3f}"
    )
    from spidr_fast.units_report import format_columns

    print(
        f"  units report (held-out, as `spidr-fast units-report`): codebook units = best head's argmax, "
        f"k-means {KMEANS_K} on the best layer"
    )
    columns = {
        "codebook, init": initial["head_metrics"],
        "codebook, trained": trained["head_metrics"],
        "k-means, init": initial["kmeans"]["metrics"],
        "k-means, trained": trained["kmeans"]["metrics"],
    }
    print("\n".join("  " + line for line in format_columns(columns)))
    print(f"  (model {exported}; {time.monotonic() - t0:.0f} s in all)")
    return 0
