"""Manifest-backed speech dataset: decodes with soundfile, checks, standardises.

Items are addressed by `index` or by `(index, epoch)` (what `BucketBatchSampler` yields), and come
back as `Utterance(index, epoch, waveform)` so the collator can seed its crops and masks from the
batch itself: results then do not depend on the number of DataLoader workers.

With `skip_bad=True`, an unusable file (see `spidr_fast.data.audio.load_audio`) comes back with
`waveform=None` and `error="NAME: REASON"`, and is logged (once per process; `log_skipped=False`
leaves that to the caller: the trainer names each file once whatever the number of workers). The
collator drops it and lists it in `Batch.skipped`, so the trainer can report and count them. Nothing
is skipped silently, and a bad file never hangs a worker: without `skip_bad` the `AudioError`
propagates to the main process.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from spidr_fast.data.audio import AudioError, IntAudio, load_audio, read_archive_member, standardize_int16
from spidr_fast.data.manifest import ManifestEntry, read_manifest

logger = logging.getLogger(__name__)


class Utterance(NamedTuple):
    """One dataset item: `waveform` is float32 (T,) standardised, or None when skipped (`error` says why),
    or int16 (T,) PCM16 samples with `stats` = (mean, scale): standardised, `(waveform - mean) * scale`."""

    index: int
    epoch: int
    waveform: torch.Tensor | None
    error: str | None = None  # "NAME: REASON" of a skipped file
    stats: tuple[float, float] | None = None  # (mean, scale) of an int16 waveform

    def standardized(self) -> torch.Tensor:
        """The waveform as the model takes it: float32 (T,) standardised (int16 ones converted here, on the host)."""
        return self.waveform if self.stats is None else standardize_int16(self.waveform, *self.stats)


def load_entry(
    entry: ManifestEntry, *, normalize: bool = True, check_length: bool = True, integer: bool = False
) -> np.ndarray | IntAudio:
    """Decode one manifest entry (file or tar member); float32 (T,), or `IntAudio` for PCM16 with `integer`
    (see `load_audio`). Raises `AudioError`."""
    source: str | bytes = entry.path
    if entry.archive is not None:
        if entry.byte_offset is None or entry.byte_size is None:
            raise AudioError(entry.name, "archive entry without byte_offset/byte_size")
        source = read_archive_member(entry.archive, entry.byte_offset, entry.byte_size)
    waveform = load_audio(source, name=entry.name, normalize=normalize, integer=integer)
    samples = len(waveform.samples if isinstance(waveform, IntAudio) else waveform)
    if check_length and samples != entry.num_samples:
        # The sampler budgets batches on manifest counts: a stale manifest would break the budget.
        raise AudioError(entry.name, f"decoded {samples} samples, the manifest says {entry.num_samples}")
    return waveform


class SpeechDataset(Dataset):
    """Utterances of a manifest (.csv/.tsv/.jsonl path or a list of entries).

    Args:
        manifest: manifest path or entries.
        normalize: standardise each utterance (mean 0, variance 1); SpidR is trained on that.
        skip_bad: skip unusable files (`waveform=None`) instead of raising `AudioError`.
        log_skipped: log each skipped file (once per process) with its reason.
        integer: with `normalize`, 16-bit PCM comes back as int16 with its (mean, scale) (`Utterance.stats`),
            standardised on the device by the trainer (`Batch.device_waveforms`); other formats as float32.
    """

    def __init__(
        self,
        manifest: str | Path | Sequence[ManifestEntry],
        *,
        normalize: bool = True,
        skip_bad: bool = False,
        log_skipped: bool = True,
        integer: bool = False,
    ) -> None:
        self.entries = read_manifest(manifest) if isinstance(manifest, (str, Path)) else list(manifest)
        self.normalize = normalize
        self.skip_bad = skip_bad
        self.log_skipped = log_skipped
        self.integer = integer
        self.num_skipped = 0  # reads skipped in this process; workers report theirs through Batch.skipped
        self._logged: set[int] = set()

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def lengths(self) -> list[int]:
        """Samples per utterance, from the manifest (what the batch sampler budgets on)."""
        return [e.num_samples for e in self.entries]

    def __getitem__(self, key: int | tuple[int, int]) -> Utterance:
        index, epoch = (key, 0) if isinstance(key, int) else (int(key[0]), int(key[1]))
        try:
            waveform = load_entry(self.entries[index], normalize=self.normalize, integer=self.integer)
        except AudioError as exc:
            if not self.skip_bad:
                raise
            self.num_skipped += 1
            if self.log_skipped and index not in self._logged:
                self._logged.add(index)
                logger.warning(
                    "skipping %s: %s (%d file(s) skipped in this process)", exc.source, exc.reason, len(self._logged)
                )
            return Utterance(index, epoch, None, f"{exc.source}: {exc.reason}")
        if isinstance(waveform, IntAudio):
            return Utterance(index, epoch, torch.from_numpy(waveform.samples), stats=(waveform.mean, waveform.scale))
        return Utterance(index, epoch, torch.from_numpy(waveform))
