"""`spidr-fast demo` end to end on a very small budget: it runs and prints its results table.

Behaviour only: no quality threshold and no timing (the demo's numbers depend on the budget and the CPU).
"""

from __future__ import annotations

import re
import subprocess
import sys


def test_demo_runs_and_prints_results(tmp_path):
    cmd = [sys.executable, "-m", "spidr_fast", "demo", "--workdir", str(tmp_path), "--minutes", "0.3"]
    cmd += ["--utterances", "30", "--max-steps", "30", "run.device=cpu"]  # not a GPU test
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for text in ("[4/4] results", "loss", "target ppl", "codewords in use", "head argmax", "k-means", "PNMI"):
        assert text in out, out
    assert "phone purity" in out and "random init" in out and "trained" in out
    # It leads with its result: the verdict opens the results block, before the details.
    results = out[out.index("[4/4] results") :].splitlines()
    assert results[2].startswith("RESULT: "), results[:4]
    assert results.index(next(line for line in results if line.startswith("  steps "))) > 2
    # Progress is a bar on stderr, not one stdout line per log interval.
    assert not re.search(r"^\s*step\s+\d+/\d+", out, re.MULTILINE), out
    assert re.search(r"train: 100%.*30/30", proc.stderr), proc.stderr[-2000:]
    # Layers numbered from 1, as `extract --layer` (the demo model has 2 layers; heads predict layers 1-2).
    for got in re.findall(r"(?:best layer:|heads: layer) (\d+) / (\d+)", out):
        assert {int(n) for n in got} <= {1, 2}, got
    assert re.search(r"best layer: \d+ / \d+", out) and re.search(r"heads: layer \d+ / \d+", out)
    assert (tmp_path / "runs" / "spidr" / "demo" / "spidr_demo.pt").is_file()
    # It ends with the units report: units-report's rows, codebook and k-means units, init and trained side by side.
    table = out[out.index("units report (held-out") :].splitlines()
    header = table[1]
    for column in ("codebook, init", "codebook, trained", "k-means, init", "k-means, trained"):
        assert column in header, header
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in table[3:] if line.strip().startswith("|")}
    for name in ("PNMI", "phone purity", "cluster purity", "unit perplexity", "bitrate (bits/s)"):
        assert len(rows[name]) == 4 and all(float(v) >= 0 for v in rows[name]), rows
    assert "mean run length (frames)" in rows and all(float(v) >= 1 for v in rows["mean run length (frames)"])


def test_target_codewords_are_the_training_objectives_own() -> None:
    # The demo's "codewords in use" counts the trainer's targets and codewords: for one utterance, the
    # perplexity of its assignments is the training forward's target_ppl (eval mode, every frame predicted).
    import types

    import torch

    from spidr_fast.checkpoint import build_model
    from spidr_fast.demo import _target_codewords_used
    from spidr_fast.train.config import read_config

    cfg = read_config("tiny").model
    model = build_model(cfg).eval()
    waveform = torch.randn(16_000)
    used = _target_codewords_used(model, [types.SimpleNamespace(waveform=waveform)])
    with torch.no_grad():
        _, metrics = model(waveform[None])
    assert len(used) == cfg.num_codebooks
    assert all(1 <= n <= cfg.codebook_size for n, _ in used)
    expected = torch.tensor([p for _, p in used]).mean()
    torch.testing.assert_close(expected, metrics["target_ppl"], rtol=1e-5, atol=0)


def test_units_report_extracts_the_dev_units_once(tmp_path, monkeypatch) -> None:
    # The head-argmax units of the dev set are extracted once per report, and give what validation's
    # unit_quality and units-report's unit_metrics give for them (the report's numbers are unchanged).
    import torch

    from spidr_fast.checkpoint import build_model
    from spidr_fast.data.corpus import generate_corpus, read_alignments
    from spidr_fast.data.dataset import SpeechDataset
    from spidr_fast.demo import _units_report
    from spidr_fast.metrics import unit_metrics
    from spidr_fast.train import validate
    from spidr_fast.train.config import read_config

    corpus = generate_corpus(tmp_path, num_utterances=4, seed=0, max_seconds=2.5)
    dataset, alignments = SpeechDataset(corpus / "manifest.csv"), read_alignments(corpus / "alignments.jsonl")
    model = build_model(read_config("tiny").model).eval()
    extract = validate.extract_units
    calls = []
    monkeypatch.setattr(validate, "extract_units", lambda *a: calls.append(a) or extract(*a))
    report = _units_report(model, dataset, dataset, alignments)
    assert len(calls) == 1
    units = extract(model, dataset, torch.device("cpu"), torch.float32)
    assert report["heads"] == validate.unit_quality(
        model, dataset, str(corpus / "alignments.jsonl"), torch.device("cpu"), torch.float32
    )
    best = unit_metrics({k: v[report["heads"]["best_head"]] for k, v in units.items()}, alignments)
    assert report["head_metrics"] == best
