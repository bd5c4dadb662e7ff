"""Synthetic corpus: deterministic per seed, alignments match audio, phones acoustically distinct."""

import json
from pathlib import Path

import numpy as np
import soundfile as sf

from spidr_fast.data.corpus import PHONES, generate_corpus, read_alignments
from spidr_fast.data.dataset import SpeechDataset
from spidr_fast.data.manifest import read_manifest


def test_layout_and_alignments_match_audio(tmp_path: Path) -> None:
    out = generate_corpus(tmp_path / "c", num_utterances=6, seed=0, num_speakers=3, min_seconds=1.0, max_seconds=2.0)
    entries = read_manifest(out / "manifest.csv")
    alignments = read_alignments(out)
    meta = json.loads((out / "corpus.json").read_text())
    assert len(entries) == 6 and len(meta["speakers"]) == 3 and meta["phones"] == [p.label for p in PHONES]
    assert len(PHONES) >= 20
    for e in entries:
        x, sr = sf.read(e.path)
        assert sr == 16_000 and x.ndim == 1 and x.shape[0] == e.num_samples
        assert 0.9 * 16_000 <= e.num_samples <= 2.6 * 16_000
        labels = alignments[e.fileid]
        assert len(labels) == e.num_samples // 160
        assert labels[0] == "sil" and labels[-1] == "sil" and set(labels) <= set(meta["phones"])
    assert len(SpeechDataset(entries)) == 6 and SpeechDataset(entries)[0].waveform is not None


def test_deterministic_per_seed(tmp_path: Path) -> None:
    a = generate_corpus(tmp_path / "a", num_utterances=3, seed=5, min_seconds=1.0, max_seconds=1.5)
    b = generate_corpus(tmp_path / "b", num_utterances=3, seed=5, min_seconds=1.0, max_seconds=1.5)
    c = generate_corpus(tmp_path / "c", num_utterances=3, seed=6, min_seconds=1.0, max_seconds=1.5)
    for wav in sorted((a / "wavs").iterdir()):
        assert wav.read_bytes() == (b / "wavs" / wav.name).read_bytes()
    assert (a / "alignments.jsonl").read_text() == (b / "alignments.jsonl").read_text()
    assert (a / "alignments.jsonl").read_text() != (c / "alignments.jsonl").read_text()


def test_phones_are_acoustically_distinct(tmp_path: Path) -> None:
    out = generate_corpus(tmp_path / "c", num_utterances=12, seed=1, min_seconds=2.0, max_seconds=3.0)
    alignments = read_alignments(out)
    freqs = np.fft.rfftfreq(400, 1 / 16_000)
    stats: dict[str, list[tuple[float, float]]] = {}
    for e in read_manifest(out / "manifest.csv"):
        x, _ = sf.read(e.path)
        for i, label in enumerate(alignments[e.fileid]):
            seg = x[i * 160 : i * 160 + 400]
            if seg.size == 400:
                power = np.abs(np.fft.rfft(seg * np.hanning(400))) ** 2
                stats.setdefault(label, []).append(((power * freqs).sum() / power.sum(), power.sum()))
    centroid = {k: np.mean([c for c, _ in v]) for k, v in stats.items()}
    energy = {k: np.mean([p for _, p in v]) for k, v in stats.items()}
    assert centroid["s"] > 4000 and centroid["sh"] < centroid["s"]  # fricative places of articulation
    assert centroid["aa"] > centroid["iy"]  # open vowel: higher F1
    assert energy["aa"] > 10 * energy["sil"]  # speech over background noise
