"""The main job on built-in defaults: pretrain a small SpidR on a synthetic corpus and show it learn.

Steps: generate the built-in corpus (synthetic speech with phone alignments, no network), pretrain
a small SpidR (`configs/tiny.toml`) for a few minutes on whatever device there is, then extract units
(argmax of each prediction head) on held-out utterances and print PNMI and phone purity of the trained
model next to the same model at initialisation, with the loss curve, codebook perplexities and
throughput.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from spidr_fast.checkpoint import build_model
from spidr_fast.data.corpus import generate_corpus
from spidr_fast.data.dataset import SpeechDataset
from spidr_fast.data.manifest import read_manifest, write_manifest
from spidr_fast.train.checkpoint import find_checkpoints
from spidr_fast.train.config import read_config
from spidr_fast.train.export import export
from spidr_fast.train.validate import unit_quality


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default=None, help="where the corpus and run go (default: a temp folder)")
    parser.add_argument("--minutes", type=float, default=3.0, help="training time budget")
    parser.add_argument("--max-steps", type=int, default=2000)
    parser.add_argument("--utterances", type=int, default=160, help="synthetic utterances (1 in 5 held out)")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value", help="on top of configs/tiny.toml")


def _units_report(model: torch.nn.Module, dev: SpeechDataset, alignments: Path) -> dict[str, float]:
    return unit_quality(model.eval(), dev, str(alignments), torch.device("cpu"), torch.float32)


def main(args: argparse.Namespace) -> int:
    from spidr_fast.train.trainer import train

    t0 = time.monotonic()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="spidr_fast_demo_"))
    print(f"[1/4] generating {args.utterances} synthetic utterances in {root / 'corpus'}")
    corpus = generate_corpus(root / "corpus", num_utterances=args.utterances, seed=0)
    entries = read_manifest(corpus / "manifest.csv")
    dev_entries = entries[::5]
    train_entries = [e for i, e in enumerate(entries) if i % 5]
    write_manifest(train_entries, root / "train.csv")
    write_manifest(dev_entries, root / "dev.csv")
    alignments = corpus / "alignments.jsonl"

    overrides = [
        f"data.manifest={root / 'train.csv'}",
        f"run.workdir={root / 'runs'}",
        "run.wandb_name=demo",
        f"run.max_time_s={args.minutes * 60}",
        f"optimizer.max_steps={args.max_steps}",
        "run.save_interval=100000",  # only the final checkpoint
        "run.log_interval=25",
        f"validation.dev.manifest={root / 'dev.csv'}",
        f"validation.dev.alignments_path={alignments}",
        "validation.dev.num_workers=0",
        "validation.dev.min_sample_size=8000",
        "validation.dev.max_sample_size=48000",
        "validation.dev.max_batch_length=192000",
        "validation.dev.num_buckets=10",
        "run.validation_interval=100000",  # validate once, at the end
        *args.overrides,
    ]
    cfg = read_config("tiny", overrides)
    dev = SpeechDataset(root / "dev.csv")
    torch.manual_seed(cfg.run.random_seed)
    initial = _units_report(build_model(cfg.model), dev, alignments)

    print(f"[2/4] pretraining a tiny SpidR for up to {args.minutes:g} min ({cfg.run.dir})")
    train(cfg)
    log = [json.loads(line) for line in (cfg.run.dir / "train_log.jsonl").read_text().splitlines()]
    train_log = [r for r in log if r["split"] == "train"]
    first, last = train_log[0], train_log[-1]

    print("[3/4] exporting the final checkpoint and extracting units on held-out utterances")
    exported = export(find_checkpoints(cfg.run.dir / "checkpoints")[-1], cfg.run.dir / "spidr_tiny.pt")
    from spidr_fast import load_model

    trained = _units_report(load_model(exported), dev, alignments)

    print("[4/4] results")
    print(f"  steps {last['step']}, epochs {last['epoch']}")
    print(f"  loss           {first['loss']:.3f} (step {first['step']}) -> {last['loss']:.3f} (step {last['step']})")
    size = cfg.model.codebook_size
    print(f"  target ppl     {first['target_ppl']:.2f} -> {last['target_ppl']:.2f} (of {size} codewords)")
    print(f"  predicted ppl  {first['pred_ppl']:.2f} -> {last['pred_ppl']:.2f}")
    print(f"  throughput     {last['audio_s_per_s']:.1f} audio s/s, {last['frames_per_s']:.0f} frames/s per device")
    print(f"  {'':14s} {'random init':>12s} {'trained':>10s}")
    best = (f"head{initial['best_head']}_unit_ppl", f"head{trained['best_head']}_unit_ppl")
    print(f"  {'unit ppl':14s} {initial[best[0]]:12.2f} {trained[best[1]]:10.2f}")
    for key, name in (("pnmi", "PNMI"), ("phone_purity", "phone purity")):
        print(f"  {name:14s} {initial[key]:12.3f} {trained[key]:10.3f}")
    print(f"  (best of {cfg.model.num_codebooks} heads; model {exported}; {time.monotonic() - t0:.0f} s in all)")
    return 0
