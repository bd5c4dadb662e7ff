"""A built-in synthetic speech corpus with ground-truth phone alignments (no download).

Speech-like, not speech: a formant synthesiser over a 26-phone inventory (10 vowels, 3 nasals,
6 stops, 6 fricatives, silence). Voiced sounds are sums of harmonics of a jittered, declining f0,
weighted by a cascade-formant envelope whose formant tracks are linearly interpolated between
neighbouring phones (coarticulation); fricatives are band-shaped noise (voiced ones add voicing);
stops are a closure (a low voice bar for b/d/g) then a burst at the place's frequency (plus
aspiration for p/t/k); nasals are a weak low-formant murmur. Speakers differ in f0 and vocal-tract
length (a formant scale); each utterance gets background noise at 20-40 dB SNR. Everything is a
pure function of the seed.

Layout written by `generate_corpus(out_dir, ...)`:
- `wavs/<fileid>.wav`: 16 kHz mono, 16-bit PCM;
- `manifest.csv`: `fileid,path,num_samples` (see `spidr_fast.data.manifest`);
- `alignments.jsonl`: one object per utterance, `{"fileid", "speaker", "frame_shift_ms": 10,
  "phones": [label, ...]}` with one label per 10 ms frame: frame i covers samples
  [160 i, 160 i + 160) and is labelled with the phone sounding at its centre (sample 160 i + 80);
  there are num_samples // 160 frames;
- `corpus.json`: sample rate, seed, phone inventory, speakers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spidr_fast.config import SAMPLE_RATE
from spidr_fast.data.audio import soundfile
from spidr_fast.data.manifest import ManifestEntry, write_manifest
from spidr_fast.io import atomic_write_text

FRAME_SHIFT = 160  # samples per alignment frame (10 ms)


@dataclass(frozen=True)
class Phone:
    """A phone's acoustic recipe: formant targets (Hz), voicing and noise amplitude, noise band (Hz)."""

    label: str
    kind: str  # vowel | nasal | stop | fricative | silence
    formants: tuple[float, float, float] = (500.0, 1500.0, 2500.0)
    voicing: float = 0.0
    noise: float = 0.0
    band: tuple[float, float] = (0.0, 0.0)
    duration_ms: tuple[int, int] = (60, 120)


# Formants: Peterson & Barney-style male averages. Noise bands: rough places of articulation.
PHONES: tuple[Phone, ...] = (
    Phone("iy", "vowel", (270, 2290, 3010), 1.0, duration_ms=(70, 160)),
    Phone("ih", "vowel", (390, 1990, 2550), 1.0, duration_ms=(60, 130)),
    Phone("eh", "vowel", (530, 1840, 2480), 1.0, duration_ms=(60, 140)),
    Phone("ae", "vowel", (660, 1720, 2410), 1.0, duration_ms=(80, 170)),
    Phone("aa", "vowel", (730, 1090, 2440), 1.0, duration_ms=(80, 170)),
    Phone("ao", "vowel", (570, 840, 2410), 1.0, duration_ms=(80, 170)),
    Phone("uh", "vowel", (440, 1020, 2240), 1.0, duration_ms=(60, 130)),
    Phone("uw", "vowel", (300, 870, 2240), 1.0, duration_ms=(70, 160)),
    Phone("ah", "vowel", (640, 1190, 2390), 1.0, duration_ms=(60, 140)),
    Phone("er", "vowel", (490, 1350, 1690), 1.0, duration_ms=(70, 160)),
    Phone("m", "nasal", (250, 1100, 2200), 0.35, duration_ms=(50, 100)),
    Phone("n", "nasal", (250, 1600, 2600), 0.35, duration_ms=(50, 100)),
    Phone("ng", "nasal", (250, 2200, 2900), 0.35, duration_ms=(50, 100)),
    Phone("p", "stop", (400, 900, 2300), 0.0, 0.5, (400, 1500), (60, 110)),
    Phone("t", "stop", (400, 1800, 2600), 0.0, 0.6, (3000, 6000), (60, 110)),
    Phone("k", "stop", (400, 2000, 2700), 0.0, 0.55, (1500, 3000), (60, 110)),
    Phone("b", "stop", (400, 900, 2300), 0.08, 0.35, (400, 1500), (50, 100)),
    Phone("d", "stop", (400, 1800, 2600), 0.08, 0.4, (3000, 6000), (50, 100)),
    Phone("g", "stop", (400, 2000, 2700), 0.08, 0.4, (1500, 3000), (50, 100)),
    Phone("s", "fricative", (400, 1800, 2600), 0.0, 0.2, (4500, 7800), (70, 150)),
    Phone("sh", "fricative", (400, 1900, 2600), 0.0, 0.2, (2200, 4500), (70, 150)),
    Phone("f", "fricative", (400, 1100, 2300), 0.0, 0.08, (1200, 7800), (60, 130)),
    Phone("z", "fricative", (400, 1800, 2600), 0.25, 0.12, (4500, 7800), (60, 130)),
    Phone("zh", "fricative", (400, 1900, 2600), 0.25, 0.12, (2200, 4500), (60, 130)),
    Phone("v", "fricative", (400, 1100, 2300), 0.3, 0.05, (1200, 7800), (50, 110)),
    Phone("sil", "silence", (500, 1500, 2500), 0.0, 0.0, duration_ms=(80, 300)),
)
_BY_LABEL = {p.label: p for p in PHONES}
_VOWELS = [p.label for p in PHONES if p.kind == "vowel"]
_CONSONANTS = [p.label for p in PHONES if p.kind in ("nasal", "stop", "fricative")]


@dataclass(frozen=True)
class Speaker:
    """A synthetic speaker: mean f0 (Hz) and vocal-tract formant scale."""

    name: str
    f0: float
    formant_scale: float


def make_speakers(num: int, seed: int) -> list[Speaker]:
    """`num` speakers, alternating low and high voices (f0 90-140 Hz or 170-240 Hz)."""
    rng = np.random.default_rng([seed, 0xC0FFEE])
    speakers = []
    for i in range(num):
        high = i % 2 == 1
        f0 = rng.uniform(170, 240) if high else rng.uniform(90, 140)
        scale = rng.uniform(1.08, 1.2) if high else rng.uniform(0.92, 1.04)
        speakers.append(Speaker(f"spk{i:02d}", float(f0), float(scale)))
    return speakers


def phone_sequence(rng: np.random.Generator, seconds: float) -> list[tuple[str, int]]:
    """(label, samples) pairs: silence, then (C)V(C) syllables up to about `seconds`, then silence."""
    seq: list[tuple[str, int]] = []

    def add(label: str) -> None:
        lo, hi = _BY_LABEL[label].duration_ms
        seq.append((label, int(rng.integers(lo, hi + 1)) * SAMPLE_RATE // 1000))

    add("sil")
    target = int(seconds * SAMPLE_RATE)
    while sum(n for _, n in seq) < target - SAMPLE_RATE // 5:
        if rng.random() < 0.8:
            add(str(rng.choice(_CONSONANTS)))
        add(str(rng.choice(_VOWELS)))
        if rng.random() < 0.3:
            add(str(rng.choice(_CONSONANTS)))
        if rng.random() < 0.08:
            add("sil")
    add("sil")
    return seq


def _formant_envelope(freqs: np.ndarray, formants: np.ndarray) -> np.ndarray:
    """Cascade of resonators, unit gain at DC: prod_i F^2 / |F^2 - f^2 + j B f|, with B = 60 + 0.06 F."""
    env = np.ones_like(freqs)
    for i in range(formants.shape[-1]):
        f_i = formants[..., i]
        bw = 60.0 + 0.06 * f_i
        env = env * f_i**2 / np.sqrt((f_i**2 - freqs**2) ** 2 + (bw * freqs) ** 2)
    return env


def _band_noise(rng: np.random.Generator, n: int, band: tuple[float, float]) -> np.ndarray:
    """White noise of `n` samples filtered to `band` (Hz) with smooth edges, unit RMS."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
    lo, hi = band
    shape = 1 / (1 + np.exp(-(f - lo) / 150)) / (1 + np.exp((f - hi) / 300))
    x = np.fft.irfft(spec * shape, n)
    return x / (np.sqrt(np.mean(x**2)) + 1e-9)


def synthesize(seq: list[tuple[str, int]], speaker: Speaker, rng: np.random.Generator) -> np.ndarray:
    """Waveform (float32, peak ~0.5) of a phone sequence spoken by `speaker`."""
    total = sum(n for _, n in seq)
    starts = np.cumsum([0] + [n for _, n in seq])
    frames = np.arange(0, total, FRAME_SHIFT)  # control points every 10 ms
    # Formant tracks: targets at phone centres, linear in between (coarticulation).
    centres = (starts[:-1] + starts[1:]) / 2
    targets = np.array([_BY_LABEL[label].formants for label, _ in seq]) * speaker.formant_scale
    formants = np.stack([np.interp(frames, centres, targets[:, i]) for i in range(3)], axis=1)  # (F, 3)
    # Voicing amplitude per frame, smoothed over ~30 ms so phones fade into each other.
    which = np.searchsorted(starts, frames, side="right") - 1
    voicing = np.array([_BY_LABEL[label].voicing for label, _ in seq])[which]
    voicing = np.convolve(voicing, np.ones(3) / 3, mode="same")
    # f0: speaker mean, slow random contour, declination, 1% jitter.
    knots = np.linspace(0, total, 6)
    contour = np.interp(frames, knots, rng.normal(0, 0.06, 6))
    f0_frames = speaker.f0 * (1 + contour) * np.linspace(1.05, 0.9, frames.size)
    f0_frames *= 1 + 0.01 * rng.standard_normal(frames.size)
    t = np.arange(total)
    f0 = np.interp(t, frames, f0_frames)
    # Harmonics as powers of z = exp(i phase): one complex multiply per harmonic and sample instead of
    # a sin; amplitudes (frame rate) are interpolated linearly inside each 10 ms block.
    padded = frames.size * FRAME_SHIFT
    phase = 2 * np.pi * np.cumsum(np.pad(f0, (0, padded - total), mode="edge")) / SAMPLE_RATE
    z = np.exp(1j * phase).reshape(frames.size, FRAME_SHIFT)  # (F, 160)
    w = np.arange(FRAME_SHIFT) / FRAME_SHIFT  # position inside a block
    zk = np.ones_like(z)
    here = np.zeros(z.shape)
    ahead = np.zeros(z.shape)
    for k in range(1, int(5000 // f0_frames.min()) + 1):
        zk *= z
        # Harmonic amplitude: formant envelope x glottal tilt (1/k), silenced above 5 kHz.
        amp = _formant_envelope(k * f0_frames, formants) / k * voicing * (k * f0_frames < 5000)
        here += amp[:, None] * zk.imag
        ahead += np.append(amp[1:], amp[-1])[:, None] * zk.imag
    voiced = ((1 - w) * here + w * ahead).reshape(-1)[:total]
    voiced /= np.max(np.abs(voiced)) + 1e-9
    noise = np.zeros(total)
    for (label, n), s in zip(seq, starts[:-1], strict=True):
        p = _BY_LABEL[label]
        if p.kind == "fricative":
            noise[s : s + n] += p.noise * _band_noise(rng, n, p.band) * _fade(n)
        elif p.kind == "stop":
            # Closure (silence or voice bar from `voicing`) then a 15 ms burst, + 25 ms aspiration if voiceless.
            burst = min(n // 3, 240) + (400 if p.voicing == 0 else 0)
            b0 = s + n - burst
            decay = np.exp(-np.arange(burst) / (burst / 3))
            noise[b0 : s + n] += p.noise * _band_noise(rng, burst, p.band) * decay
    x = voiced + noise
    x /= np.max(np.abs(x)) + 1e-9
    snr_db = rng.uniform(20, 40)
    x += rng.standard_normal(total) * np.sqrt(np.mean(x**2)) * 10 ** (-snr_db / 20)
    return (0.5 * x / (np.max(np.abs(x)) + 1e-9)).astype(np.float32)


def _fade(n: int) -> np.ndarray:
    """Gain of n samples with 5 ms linear fade-in and fade-out (no clicks at segment edges)."""
    edge = np.minimum(np.arange(n) + 1, np.arange(n, 0, -1))
    return np.minimum(1.0, edge / 80.0)


def frame_labels(seq: list[tuple[str, int]]) -> list[str]:
    """One label per 10 ms frame: the phone sounding at the frame's centre sample."""
    total = sum(n for _, n in seq)
    ends = np.cumsum([n for _, n in seq])
    centres = np.arange(total // FRAME_SHIFT) * FRAME_SHIFT + FRAME_SHIFT // 2
    which = np.searchsorted(ends, centres, side="right")
    return [seq[i][0] for i in which]


def generate_corpus(
    out_dir: str | Path,
    num_utterances: int = 100,
    seed: int = 0,
    *,
    num_speakers: int = 6,
    min_seconds: float = 2.0,
    max_seconds: float = 6.0,
) -> Path:
    """Write a synthetic corpus (wavs, manifest.csv, alignments.jsonl, corpus.json) to `out_dir`.

    Args:
        out_dir: folder to create (files inside are overwritten).
        num_utterances: how many utterances; speakers take turns.
        seed: everything (speakers, phones, durations, noise) is a function of it.
        num_speakers: distinct synthetic speakers.
        min_seconds, max_seconds: utterance durations, drawn uniformly.

    Returns:
        `out_dir` as a Path.
    """
    if not 0 < min_seconds <= max_seconds:
        raise ValueError(f"need 0 < min_seconds <= max_seconds, got {min_seconds}, {max_seconds}")
    out = Path(out_dir)
    (out / "wavs").mkdir(parents=True, exist_ok=True)
    speakers = make_speakers(num_speakers, seed)
    entries, alignments = [], []
    for i in range(num_utterances):
        rng = np.random.default_rng([seed, i])
        speaker = speakers[i % num_speakers]
        seq = phone_sequence(rng, rng.uniform(min_seconds, max_seconds))
        wav = synthesize(seq, speaker, rng)
        fileid = f"{speaker.name}_{i:05d}"
        path = out / "wavs" / f"{fileid}.wav"
        soundfile().write(path, wav, SAMPLE_RATE, subtype="PCM_16")
        entries.append(ManifestEntry(fileid, str(path.resolve()), int(wav.shape[0])))
        labels = frame_labels(seq)
        alignments.append({"fileid": fileid, "speaker": speaker.name, "frame_shift_ms": 10, "phones": labels})
    write_manifest(entries, out / "manifest.csv")
    atomic_write_text(out / "alignments.jsonl", "".join(json.dumps(a) + "\n" for a in alignments))
    meta = {
        "sample_rate": SAMPLE_RATE,
        "seed": seed,
        "num_utterances": num_utterances,
        "frame_shift_ms": 10,
        "phones": [p.label for p in PHONES],
        "speakers": [s.__dict__ for s in speakers],
    }
    atomic_write_text(out / "corpus.json", json.dumps(meta, indent=2) + "\n")
    return out


def read_alignments(path: str | Path) -> dict[str, list[str]]:
    """fileid -> per-10 ms phone labels, from an `alignments.jsonl` (a corpus folder works too)."""
    path = Path(path)
    if path.is_dir():
        path = path / "alignments.jsonl"
    with path.open(encoding="utf-8") as f:
        return {row["fileid"]: row["phones"] for row in map(json.loads, filter(str.strip, f))}
