"""Unit-quality metrics from discrete units and frame-level phone alignments.

Definitions (HuBERT, DinoSR and SpidR evaluations), with y the phone and z the unit of a frame and
p(y, z) their joint frequency over all aligned frames:
- phone purity   = E_z[max_y p(y | z)] = sum_z max_y p(y, z)   (how phone-pure each unit is);
- cluster purity = E_y[max_z p(z | y)] = sum_y max_z p(y, z)   (how concentrated each phone is);
- PNMI           = I(y; z) / H(y)                                (phone-normalised mutual information);
- perplexity     = 2 ** H(z), H in bits over the unit frequencies (as the SpidR training log);
- active codewords = number of distinct units used;
- bitrate        = (units per second) x H(z) bits, after merging runs of repeated units by default
                   (the entropy-coded rate a unit language model sees; `deduplicate=False` keeps every frame);
- mean run length = frames per run of a repeated unit (1 when no unit repeats).

`item_file` writes an ABX item file (ZeroSpeech / Libri-light columns) from frame-level phone alignments.

Frame rates: SpidR units are at 50 Hz (20 ms), alignments at 100 Hz (10 ms). Each unit is repeated
to cover its label frames (unit i -> label frames 2i and 2i + 1, i.e. both 10 ms frames inside
its 20 ms hop), then both sequences are cut to the shorter length (the conv extractor drops the
last partial frame, so units may end up to one frame early). Any integer ratio between the two
rates works the same way, in either direction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class UnitMetrics:
    """Unit quality over a set of utterances (see the module docstring for the definitions)."""

    pnmi: float
    phone_purity: float
    cluster_purity: float
    perplexity: float
    active_codewords: int
    bitrate: float
    num_frames: int
    mean_run_length: float = 1.0


def align(
    units: np.ndarray, labels: Sequence[str] | np.ndarray, unit_rate: float = 50, label_rate: float = 100
) -> tuple[np.ndarray, np.ndarray]:
    """Units and labels on a common frame grid: the slower sequence is repeated, both cut to the shorter.

    Args:
        units: int (frames,) at `unit_rate` Hz.
        labels: (label_frames,) at `label_rate` Hz.

    Returns:
        (units, labels), both of the same length, at max(unit_rate, label_rate) Hz.
    """
    units, labels = np.asarray(units), np.asarray(labels)
    ratio = label_rate / unit_rate
    if ratio >= 1 and float(ratio).is_integer():
        units = np.repeat(units, int(ratio))
    elif ratio < 1 and float(1 / ratio).is_integer():
        labels = np.repeat(labels, int(1 / ratio))
    else:
        raise ValueError(f"unit_rate {unit_rate} Hz and label_rate {label_rate} Hz are not integer multiples")
    n = min(units.shape[0], labels.shape[0])
    return units[:n], labels[:n]


def contingency(
    units: Sequence[int] | np.ndarray, labels: Sequence[str] | np.ndarray
) -> tuple[np.ndarray, list[str], list[int]]:
    """Counts of (phone, unit) pairs over aligned frames.

    Returns:
        (counts int64 (num_phones, num_units), phone names, unit ids), rows and columns sorted.
    """
    phones, y = np.unique(np.asarray(labels), return_inverse=True)
    ids, z = np.unique(np.asarray(units), return_inverse=True)
    counts = np.zeros((phones.size, ids.size), dtype=np.int64)
    np.add.at(counts, (y, z), 1)
    return counts, phones.tolist(), ids.tolist()


def _entropy_bits(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def pnmi(counts: np.ndarray) -> float:
    """I(y; z) / H(y) from a (phones, units) count table (1 when units determine phones)."""
    joint = counts / counts.sum()
    h_y = _entropy_bits(joint.sum(1))
    mutual = _entropy_bits(joint.sum(1)) + _entropy_bits(joint.sum(0)) - _entropy_bits(joint.reshape(-1))
    return mutual / h_y if h_y > 0 else 0.0


def phone_purity(counts: np.ndarray) -> float:
    """sum over units of the most frequent phone's share of all frames."""
    return float(counts.max(0).sum() / counts.sum())


def cluster_purity(counts: np.ndarray) -> float:
    """sum over phones of the most frequent unit's share of all frames."""
    return float(counts.max(1).sum() / counts.sum())


def perplexity(units: Sequence[int] | np.ndarray) -> float:
    """2 ** (entropy in bits of the unit frequencies)."""
    _, counts = np.unique(np.asarray(units), return_counts=True)
    return float(2 ** _entropy_bits(counts / counts.sum()))


def run_starts(sequence: np.ndarray) -> np.ndarray:
    """Indices (int64) where a run of equal values starts in a 1-D sequence: 0, then every i with
    sequence[i] != sequence[i - 1]. Empty for an empty sequence. The one place runs are found
    (`bitrate`, `mean_run_length`, `item_file`, `spidr_fast.units.merge_runs`)."""
    s = np.asarray(sequence)
    if s.size == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.concatenate([[True], s[1:] != s[:-1]])).astype(np.int64)


def bitrate(sequences: Sequence[np.ndarray], frame_rate: float = 50, *, deduplicate: bool = True) -> float:
    """Bits per second: (units per second) x entropy (bits) of the unit distribution.

    Args:
        sequences: int unit sequences, one per utterance, at `frame_rate` Hz.
        deduplicate: merge runs of a repeated unit first (each run is one token).
    """
    seconds = sum(len(s) for s in sequences) / frame_rate
    tokens = [np.asarray(s) for s in sequences]
    if deduplicate:
        tokens = [s[run_starts(s)] for s in tokens]
    flat = np.concatenate(tokens) if tokens else np.zeros(0, dtype=np.int64)
    if flat.size == 0:
        return 0.0
    _, counts = np.unique(flat, return_counts=True)
    return flat.size / seconds * _entropy_bits(counts / counts.sum())


def unit_metrics(
    units: Mapping[str, np.ndarray],
    alignments: Mapping[str, Sequence[str]],
    *,
    unit_rate: float = 50,
    label_rate: float = 100,
    ignore: Sequence[str] = (),
) -> UnitMetrics:
    """All metrics for the utterances present in both `units` and `alignments`.

    Args:
        units: fileid -> int (frames,) unit ids at `unit_rate` Hz.
        alignments: fileid -> per-frame phone labels at `label_rate` Hz (`spidr_fast.data.corpus.read_alignments`).
        ignore: phone labels left out of the phone metrics (e.g. ("sil",)); perplexity, active
            codewords and bitrate always use every unit frame.
    """
    common = sorted(set(units) & set(alignments))
    if not common:
        raise ValueError("no fileid is in both `units` and `alignments`")
    counts, _, _ = phone_unit_counts(units, alignments, unit_rate=unit_rate, label_rate=label_rate, ignore=ignore)
    return metrics_from_counts(counts, [units[f] for f in common], unit_rate)


def metrics_from_counts(counts: np.ndarray, units: Sequence[np.ndarray], unit_rate: float = 50) -> UnitMetrics:
    """`unit_metrics` from its (phones, units) table (`phone_unit_counts`) and the units of the same
    utterances (in the same order), for a caller that needs the table too."""
    raw = [np.asarray(u) for u in units]
    every_unit = np.concatenate(raw)
    return UnitMetrics(
        pnmi=pnmi(counts),
        phone_purity=phone_purity(counts),
        cluster_purity=cluster_purity(counts),
        perplexity=perplexity(every_unit),
        active_codewords=int(np.unique(every_unit).size),
        bitrate=bitrate(raw, unit_rate),
        num_frames=int(counts.sum()),
        mean_run_length=mean_run_length(raw),
    )


def phone_unit_counts(
    units: Mapping[str, np.ndarray],
    alignments: Mapping[str, Sequence[str]],
    *,
    unit_rate: float = 50,
    label_rate: float = 100,
    ignore: Sequence[str] = (),
) -> tuple[np.ndarray, list[str], list[int]]:
    """The (phones, units) `contingency` table over the utterances in both `units` and `alignments`,
    phone labels in `ignore` left out."""
    aligned = [align(units[f], alignments[f], unit_rate, label_rate) for f in sorted(set(units) & set(alignments))]
    all_units = np.concatenate([u for u, _ in aligned])
    all_labels = np.concatenate([y for _, y in aligned])
    keep = ~np.isin(all_labels, list(ignore))
    return contingency(all_units[keep], all_labels[keep])


def mean_run_length(sequences: Sequence[np.ndarray]) -> float:
    """Frames per run of a repeated unit, over all sequences (runs never cross sequences)."""
    frames = sum(len(s) for s in sequences)
    runs = sum(run_starts(s).size for s in sequences)
    return frames / runs if runs else 0.0


ITEM_HEADER = "#file onset offset #phone prev-phone next-phone speaker"


def item_file(
    alignments: Mapping[str, Sequence[str]] | str | Path,
    out: str | Path,
    *,
    speakers: Mapping[str, str] | None = None,
    frame_shift: float = 0.01,
    ignore: Sequence[str] = ("sil",),
) -> int:
    """Write an ABX item file (triphone contexts) from frame-level phone alignments; returns its rows.

    Columns, as ZeroSpeech's and Libri-light's item files: `#file onset offset #phone prev-phone
    next-phone speaker`, space-separated, onset and offset in seconds from the file's start. A row
    is one phone token (a run of equal frame labels) that has a token on each side (its context):
    the first and last tokens of a file are only contexts, and so are the `ignore` labels (silence).

    Args:
        alignments: fileid -> per-frame phone labels (`spidr_fast.data.corpus.read_alignments`), or
            the path of an `alignments.jsonl` (or corpus folder), whose "speaker" fields are then used.
        out: the item file, written atomically.
        speakers: fileid -> speaker; default: the alignments file's, else the fileid up to its first
            "-" or "_" (LibriSpeech's `6295-244435-0000` -> `6295`, the built-in corpus's `spk00_00001` -> `spk00`).
        frame_shift: seconds per alignment frame (10 ms).
    """
    import json
    import re

    from spidr_fast.io import atomic_write_text

    if isinstance(alignments, (str, Path)):
        path = Path(alignments)
        path = path / "alignments.jsonl" if path.is_dir() else path
        with path.open(encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        alignments = {r["fileid"]: r["phones"] for r in rows}
        speakers = speakers or {r["fileid"]: r["speaker"] for r in rows if "speaker" in r}
    speakers = speakers or {}
    lines = [ITEM_HEADER]
    for fileid in sorted(alignments):
        if any(c.isspace() for c in fileid):
            raise ValueError(f"fileid {fileid!r} holds whitespace: item files are space-separated")
        labels = np.asarray(alignments[fileid])
        if labels.size == 0:
            continue
        starts = run_starts(labels)
        ends = np.append(starts[1:], labels.size)
        phones = labels[starts]
        speaker = speakers.get(fileid) or re.split(r"[-_]", fileid, maxsplit=1)[0]
        for i in range(1, len(phones) - 1):
            if phones[i] in ignore:
                continue
            onset, offset = starts[i] * frame_shift, ends[i] * frame_shift
            lines.append(f"{fileid} {onset:.4f} {offset:.4f} {phones[i]} {phones[i - 1]} {phones[i + 1]} {speaker}")
    atomic_write_text(out, "\n".join(lines) + "\n")
    return len(lines) - 1
