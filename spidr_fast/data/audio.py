"""Audio decoding and checks, shared by the training dataset and the extraction CLI.

`load_audio` decodes one utterance with soundfile (wav, flac, ogg; a path or the bytes of a tar
member; soundfile is imported on first use through `soundfile()`, so the models, kernels and
extractor import without it), checks it is usable for SpidR (16 kHz, mono, at least 400 samples = one frame, finite
samples) and standardises it (mean 0, variance 1 over the whole waveform, float32), which is what
the model expects: the model itself never standardises. Every failure raises `AudioError` naming
the file and the reason.

With `integer=True`, 16-bit PCM (WAV, FLAC) is decoded as int16 and not standardised on the host:
`IntAudio(samples, mean, scale)` carries the per-utterance statistics, and
`standardize_on_device` computes `(samples - mean) * scale` where the batch lands (half the bytes of
float32 through the loader's shared memory, pinning and the host-to-device copy), equal to
`standardize` of the float decoding to ~1e-7. Float formats (float WAV, OGG/MP3) stay on the float path.
"""

from __future__ import annotations

import io
import mmap
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:  # torch is imported where it is used: `spidr-fast manifest` (which imports this) runs without it
    import torch

from spidr_fast.config import SAMPLE_RATE
from spidr_fast.framing import RECEPTIVE_FIELD  # fewer samples give zero frames

_LAYER_NORM_EPS = 1e-5  # torch.nn.functional.layer_norm's default, what the reference standardises with
PCM16_FULL_SCALE = 32768.0  # soundfile's float decoding of PCM16 is int16 / 32768


def soundfile() -> ModuleType:
    """The `soundfile` module, imported here on first use: only decoding, headers and writing audio need it.

    Raises:
        ImportError: soundfile (or its libsndfile) is missing, with what to install.
    """
    try:
        import soundfile as sf
    except (ImportError, OSError) as exc:  # OSError: the module is there but libsndfile is not
        raise ImportError(
            f"reading or writing audio files needs the soundfile package ({type(exc).__name__}: {exc}): "
            "`pip install soundfile` (its wheels bundle libsndfile)"
        ) from exc
    return sf


class AudioError(ValueError):
    """An utterance that cannot be used: `source` names the file (or archive member), `reason` says why.

    One argument is taken as a whole message: that is how DataLoader re-raises a worker's error in the
    main process (with the worker's traceback), so the type survives and can be caught there.
    """

    def __init__(self, source: str, reason: str | None = None) -> None:
        super().__init__(source if reason is None else f"{source}: {reason}")
        self.source = source
        self.reason = source if reason is None else reason


def standardize(waveform: np.ndarray) -> np.ndarray:
    """(x - mean) / sqrt(var + 1e-5) over the whole waveform, as a layer norm without affine.

    Args:
        waveform: float (T,).

    Returns:
        float32 (T,). Statistics are accumulated in float64 so long utterances lose no precision.
    """
    x = waveform.astype(np.float64, copy=False)
    mean = x.mean()
    var = x.var()
    return ((x - mean) / np.sqrt(var + _LAYER_NORM_EPS)).astype(np.float32)


class IntAudio(NamedTuple):
    """A PCM16 utterance left as int16: standardised, it is `(samples - mean) * scale` (`standardize` of the
    float decoding, whose samples are `samples / 32768`)."""

    samples: np.ndarray  # int16 (T,)
    mean: float  # of the int16 samples
    scale: float  # 1 / sqrt(var + 1e-5 * 32768**2), var of the int16 samples


def int16_stats(samples: np.ndarray) -> tuple[float, float]:
    """(mean, scale) of int16 samples such that `(samples - mean) * scale` is `standardize(samples / 32768)`.

    The sums are exact integers (int32 squares, int64 sums, the variance's numerator in Python ints) and
    need no float64 copy of the utterance (a BLAS float64 dot was 20x slower in a loader worker)."""
    x = samples.astype(np.int32)
    n = x.shape[0]
    s1 = int(x.sum(dtype=np.int64))
    s2 = int(np.square(x).sum(dtype=np.int64))
    var = (s2 * n - s1 * s1) / (n * n)
    return s1 / n, 1.0 / float(np.sqrt(var + _LAYER_NORM_EPS * PCM16_FULL_SCALE**2))


def standardize_int16(samples: torch.Tensor, mean: float, scale: float) -> torch.Tensor:
    """float32 (T,) `(samples - mean) * scale` on the host (an int16 utterance batched with float ones)."""
    return ((samples.double() - mean) * scale).float()


def standardize_on_device(
    waveforms: torch.Tensor,
    device: torch.device | str,
    mean: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """A batch's waveforms as the model takes them, float32 standardised, on `device`.

    Args:
        waveforms: float32 (B, T) already standardised (returned moved), or int16 (B, T) with per-row
            `mean`/`scale` (B,), or int16 (1, S) packed utterances with per-utterance `mean`/`scale` (n,)
            and `lengths` (n,) samples each.
        device: where the model runs; the copy is asynchronous from pinned memory.

    Returns:
        float32 (B, T) on `device`.
    """
    import torch

    x = waveforms.to(device, non_blocking=True)
    if waveforms.dtype != torch.int16:
        return x
    if mean is None or scale is None:
        raise ValueError("int16 waveforms need their per-utterance mean and scale")
    mean, scale = mean.to(device, non_blocking=True), scale.to(device, non_blocking=True)
    if lengths is not None and waveforms.shape[0] == 1 and mean.shape[0] != 1:  # packed: per-utterance spans
        lengths = lengths.to(device, non_blocking=True)
        size = waveforms.shape[1]
        mean = mean.repeat_interleave(lengths, output_size=size)[None]
        scale = scale.repeat_interleave(lengths, output_size=size)[None]
    else:
        mean, scale = mean[:, None], scale[:, None]
    return torch.sub(x, mean).mul_(scale)  # int16 - float32 -> float32


@lru_cache(maxsize=256)
def _archive_map(archive: str) -> mmap.mmap:
    # One read-only map per archive and process (DataLoader workers each build their own), reused
    # for every member: no open/seek/close per utterance.
    with open(archive, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def read_archive_member(archive: str | Path, byte_offset: int, byte_size: int) -> bytes:
    """The bytes of one member of an uncompressed tar, from its data offset and size (a manifest row)."""
    data = _archive_map(str(archive))
    if byte_offset < 0 or byte_offset + byte_size > len(data):
        raise AudioError(
            f"{archive}@{byte_offset}",
            f"byte range [{byte_offset}, {byte_offset + byte_size}) is outside the archive ({len(data)} bytes)",
        )
    return data[byte_offset : byte_offset + byte_size]


def load_audio(
    source: str | Path | bytes, *, name: str | None = None, normalize: bool = True, integer: bool = False
) -> np.ndarray | IntAudio:
    """Decode, check and (by default) standardise one utterance.

    Args:
        source: a file path, or the encoded bytes of a file (e.g. a tar member).
        name: how errors name the source (defaults to the path; pass it for bytes).
        normalize: standardise to mean 0, variance 1 (what SpidR is trained on).
        integer: with `normalize`, return 16-bit PCM as `IntAudio` (int16 and its statistics), to be
            standardised by `standardize_on_device`; other encodings are decoded as float as usual.

    Returns:
        float32 (T,), T >= 400; or `IntAudio` (see `integer`).

    Raises:
        AudioError: unreadable, not 16 kHz, not mono, empty, shorter than 400 samples, or NaN/Inf.
    """
    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    sf = soundfile()  # outside the try: a missing package is not an unreadable file
    try:
        handle = io.BytesIO(source) if isinstance(source, bytes) else source
        with sf.SoundFile(handle) as f:
            as_int16 = integer and normalize and f.subtype == "PCM_16"
            waveform = f.read(dtype="int16" if as_int16 else "float32", always_2d=True)
            sample_rate = f.samplerate
    except Exception as exc:  # soundfile raises LibsndfileError, RuntimeError, TypeError, OSError...
        raise AudioError(label, f"unreadable ({type(exc).__name__}: {exc})") from exc
    check_audio(waveform, sample_rate, label)
    waveform = waveform[:, 0]
    if as_int16:
        return IntAudio(waveform, *int16_stats(waveform))
    return standardize(waveform) if normalize else waveform


def check_audio(waveform: np.ndarray, sample_rate: int, name: str) -> None:
    """Raise `AudioError` unless `waveform` (frames, channels) is usable 16 kHz mono audio."""
    if sample_rate != SAMPLE_RATE:
        raise AudioError(name, f"sample rate {sample_rate} Hz, expected {SAMPLE_RATE} Hz")
    if waveform.ndim != 2 or waveform.shape[1] != 1:
        channels = waveform.shape[1] if waveform.ndim == 2 else waveform.ndim
        raise AudioError(name, f"{channels} channels, expected mono")
    if waveform.shape[0] == 0:
        raise AudioError(name, "empty (0 samples)")
    if waveform.shape[0] < RECEPTIVE_FIELD:
        raise AudioError(name, f"too short: {waveform.shape[0]} samples < {RECEPTIVE_FIELD} (one frame)")
    if waveform.dtype.kind == "f" and not np.isfinite(waveform).all():
        raise AudioError(name, "holds NaN or Inf samples")
