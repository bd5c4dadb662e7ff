"""Inputs and outputs of `spidr-fast extract`: listing, sharding, decoding, atomic saving, resume.

- Inputs: a folder (every audio file below it, by extension), a manifest (.csv/.tsv/.jsonl, see
  `spidr_fast.data.manifest`, tar members included) or one audio file. Each input has a `key`,
  its output path without suffix: the path relative to the folder (`a/b/c.flac` -> `a/b/c`), the
  manifest's fileid, or the file's stem.
- Outputs: `OUTPUT_DIR/key.npy` when one array is extracted, `OUTPUT_DIR/key.<name>.npy` per
  array (`layer6`, `units`, ...) when several; in the pt format `OUTPUT_DIR/key.pt` holds the
  tensor itself when one array is extracted (what fastabx's default `torch.load` reads), else a
  {name: tensor} dict. `flat_inputs` names each output by its file id alone (`a/b/c` -> `c`).
  Every file is written to a temporary name in its folder and renamed (`os.replace`): a path
  that exists is complete. `is_complete` also checks sizes and contents, so a partial or foreign
  file is redone, and `remove_stale_temps` clears what a killed run left.
- Sharding: an input belongs to rank `crc32(key) % world_size`, a function of the key alone, so
  a restarted rank (or a rerun on a grown folder) takes exactly the same files.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from spidr_fast.config import SAMPLE_RATE
from spidr_fast.data.audio import AudioError, check_audio, read_archive_member, soundfile
from spidr_fast.data.manifest import AUDIO_EXTENSIONS, ManifestEntry, read_manifest
from spidr_fast.io import TEMP_SUFFIX, atomic_write

EXTENSIONS = (*AUDIO_EXTENSIONS, ".mp3", ".aiff", ".aif", ".au")
MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl")
INTEGER_OUTPUTS = ("units", "durations")  # (frames,) or (runs,) int64; the others are (frames, D) features


@dataclass(frozen=True)
class Input:
    """One file to extract: `key` names its outputs, `entry` says where its audio is."""

    key: str
    entry: ManifestEntry

    @property
    def name(self) -> str:
        return self.entry.name


def list_inputs(source: str | Path, extensions: Sequence[str] = EXTENSIONS) -> list[Input]:
    """Every input under a folder, in a manifest, or the one file; sorted by key (see `split_shared_keys`)."""
    source = Path(source)
    if source.is_dir():
        root = source.resolve()
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in extensions and p.is_file())
        inputs = [Input(p.relative_to(root).with_suffix("").as_posix(), _file_entry(p)) for p in files]
    elif source.is_file() and source.suffix.lower() in MANIFEST_SUFFIXES:
        inputs = [Input(Path(e.fileid).with_suffix("").as_posix(), e) for e in read_manifest(source)]
    elif source.is_file():
        inputs = [Input(source.stem, _file_entry(source.resolve()))]
    else:
        raise FileNotFoundError(f"{source}: no such file or folder")
    for item in inputs:
        if item.key.startswith(("/", "../")) or "/../" in item.key:
            raise ValueError(f"{source}: output key {item.key!r} would leave the output folder")
    return sorted(inputs, key=lambda i: i.key)


def split_shared_keys(inputs: Sequence[Input]) -> tuple[list[Input], list[tuple[str, str]]]:
    """(inputs whose key is their own, (name, reason) of those sharing one: `clip.wav` and `clip.ogg` -> `clip`)."""
    by_key: dict[str, list[Input]] = {}
    for item in inputs:
        by_key.setdefault(item.key, []).append(item)
    unique = [group[0] for group in by_key.values() if len(group) == 1]
    shared = []
    for key, group in by_key.items():
        for item in group if len(group) > 1 else ():
            others = ", ".join(o.name for o in group if o is not item)
            shared.append((item.name, f"its output name {key!r} is also that of {others}: rename one of them"))
    return unique, shared


def flat_inputs(inputs: Sequence[Input]) -> list[Input]:
    """The inputs keyed by their file id, the last part of the key (`a/b/c` -> `c`): one flat output folder.
    Two inputs with one file id share an output name: `split_shared_keys` reports both as failures."""
    return [Input(key=item.key.rsplit("/", 1)[-1], entry=item.entry) for item in inputs]


def _file_entry(path: Path) -> ManifestEntry:
    return ManifestEntry(fileid=path.stem, path=str(path), num_samples=-1)


def shard(inputs: Sequence[Input], rank: int, world_size: int) -> list[Input]:
    """The inputs of `rank`: those whose crc32(key) % world_size == rank (disjoint, covering, stable)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    return [i for i in inputs if zlib.crc32(i.key.encode()) % world_size == rank]


def probe_seconds(item: Input) -> float:
    """Duration from the header (no decoding), 0 when it cannot be read (decoding then reports why)."""
    sf = soundfile()
    try:
        if item.entry.num_samples >= 0 and not item.entry.in_archive:
            return item.entry.num_samples / SAMPLE_RATE
        info = sf.info(_open(item))
        return info.frames / info.samplerate
    except Exception:
        return 0.0


def _open(item: Input) -> str | object:
    e = item.entry
    if e.in_archive:
        import io

        return io.BytesIO(read_archive_member(e.archive, e.byte_offset, e.byte_size))
    return e.path


# ---------------------------------------------------------------- decoding
def read_audio(item: Input, *, resample: bool = False, downmix: bool = False) -> np.ndarray:
    """Decode and check one input: float32 (samples,) at 16 kHz, not standardised.

    Raises `AudioError` (unreadable, empty, < 400 samples, NaN/Inf, and, unless the flags allow
    converting them, several channels or another sample rate: the reason names the flag).
    """
    sf = soundfile()
    try:
        waveform, sample_rate = sf.read(_open(item), dtype="float32", always_2d=True)
    except AudioError:
        raise
    except Exception as exc:  # soundfile raises LibsndfileError, RuntimeError, TypeError, OSError...
        raise AudioError(item.name, f"unreadable ({type(exc).__name__}: {exc})") from exc
    return conform(waveform, sample_rate, item.name, resample=resample, downmix=downmix)


def conform(
    waveform: np.ndarray,
    sample_rate: int,
    name: str,
    *,
    resample: bool,
    downmix: bool,
    hints: tuple[str, str] = ("--resample", "--downmix"),
) -> np.ndarray:
    """(samples, channels) audio -> checked float32 (samples,) at 16 kHz mono, converted where allowed.

    `hints` name the options that allow resampling and downmixing in the errors' advice.
    """
    if waveform.shape[0] == 0:
        raise AudioError(name, "empty (0 samples)")
    if waveform.shape[1] > 1:
        if not downmix:
            raise AudioError(name, f"{waveform.shape[1]} channels, expected mono: pass {hints[1]} to average them")
        waveform = waveform.mean(axis=1, keepdims=True)
    if sample_rate != SAMPLE_RATE and waveform.shape[0] > 0:
        if not resample:
            raise AudioError(
                name, f"sample rate {sample_rate} Hz, expected {SAMPLE_RATE} Hz: pass {hints[0]} to convert it"
            )
        if not np.isfinite(waveform).all():
            raise AudioError(name, "holds NaN or Inf samples")
        waveform = resample_audio(waveform[:, 0], sample_rate, SAMPLE_RATE)[:, None]
        sample_rate = SAMPLE_RATE
    check_audio(waveform, sample_rate, name)
    return np.ascontiguousarray(waveform[:, 0], dtype=np.float32)


def resample_audio(x: np.ndarray, orig: int, new: int, *, zeros: int = 16, rolloff: float = 0.945) -> np.ndarray:
    """Band-limited resampling (polyphase windowed sinc, Hann window): (S,) at `orig` Hz -> (S * new / orig,).

    The cut-off is `rolloff` x the lower Nyquist frequency, each output sample sums `2 * zeros`
    input samples per side, computed as one strided conv1d with a (new / g) x width filter bank.
    """
    g = math.gcd(orig, new)
    orig, new = orig // g, new // g
    cutoff = rolloff * min(orig, new)
    width = math.ceil(zeros * orig / cutoff)
    idx = torch.arange(-width, width + orig, dtype=torch.float64)[None] / orig  # (1, W)
    phase = -torch.arange(new, dtype=torch.float64)[:, None] / new  # (new, 1)
    t = (phase + idx) * cutoff  # in units of the low-pass period
    t = t.clamp(-zeros, zeros)
    window = torch.cos(t * math.pi / zeros / 2) ** 2
    kernel = torch.where(t == 0, torch.ones_like(t), torch.sin(math.pi * t) / (math.pi * t)) * window * cutoff / orig
    signal = torch.nn.functional.pad(torch.from_numpy(x.astype(np.float64))[None, None], (width, width + orig))
    y = torch.nn.functional.conv1d(signal, kernel[:, None], stride=orig)  # (1, new, S / orig)
    out = y[0].t().reshape(-1)  # interleave the phases
    return out[: math.ceil(new * x.shape[0] / orig)].float().numpy()


# ---------------------------------------------------------------- outputs
def output_paths(out_dir: Path, key: str, names: Sequence[str], fmt: str) -> dict[str, Path]:
    """name -> output file ({"*": key.pt} in the pt format: the tensor of the one name, else a dict)."""
    if fmt == "pt":
        return {"*": out_dir / f"{key}.pt"}
    if len(names) == 1:
        return {names[0]: out_dir / f"{key}.npy"}
    return {name: out_dir / f"{key}.{name}.npy" for name in names}


def is_complete(paths: dict[str, Path], names: Sequence[str]) -> bool:
    """Every output exists, is whole and holds what is asked (a partial or stale file is redone)."""
    try:
        for name, path in paths.items():
            if name == "*":
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                if len(names) == 1:
                    if not isinstance(obj, torch.Tensor) or (obj.ndim == 1) != (names[0] in INTEGER_OUTPUTS):
                        return False
                elif not isinstance(obj, dict) or sorted(obj) != sorted(names):
                    return False
            elif not _npy_whole(path, name):
                return False
    except Exception:
        return False
    return True


def _npy_whole(path: Path, name: str) -> bool:
    with path.open("rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
        expected = f.tell() + math.prod(shape) * dtype.itemsize
    want_units = name in INTEGER_OUTPUTS
    return os.path.getsize(path) == expected and (len(shape) == 1) == want_units


def save_outputs(result: dict[str, torch.Tensor], paths: dict[str, Path], save_dtype: torch.dtype) -> None:
    """Write one input's outputs, each atomically (temp file in the same folder + os.replace)."""
    arrays = {k: (v if k in INTEGER_OUTPUTS else v.to(save_dtype)).contiguous() for k, v in result.items()}
    for name, path in paths.items():
        if name == "*":
            obj = next(iter(arrays.values())) if len(arrays) == 1 else arrays  # one array: the plain tensor
            atomic_write(path, lambda tmp, o=obj: torch.save(o, tmp))
        else:
            array = arrays[name].numpy()
            atomic_write(path, lambda tmp, a=array: _save_npy(tmp, a))


def read_pt(path: Path, name: str | None = None, *, mmap: bool = False) -> torch.Tensor:
    """The array `name` of an `extract --format pt` file: its tensor (one array per file) or its dict's entry."""
    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    if isinstance(obj, torch.Tensor):
        return obj
    if not isinstance(obj, dict) or name not in obj:
        keys = ", ".join(sorted(obj)) if isinstance(obj, dict) else "none"
        raise ValueError(f"{path}: no {name!r} array (it holds: {keys}); not from `spidr-fast extract --format pt`?")
    return obj[name]


def _save_npy(tmp: str, array: np.ndarray) -> None:
    with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a name
        np.save(f, array)


def remove_stale_temps(paths: Sequence[Path]) -> int:
    """Delete temp files a killed run left for these outputs (`.name.XXXX.tmp` beside them); returns how many."""
    by_dir: dict[Path, set[str]] = {}
    for p in paths:
        by_dir.setdefault(p.parent, set()).add(p.name)
    removed = 0
    for folder, names in by_dir.items():
        if not folder.is_dir():
            continue
        for entry in os.scandir(folder):
            if entry.name.startswith(".") and entry.name.endswith(TEMP_SUFFIX):
                target = entry.name[1:].rsplit(".", 2)[0]  # ".c.npy.ab12cd.tmp" -> "c.npy"
                if target in names:
                    Path(entry.path).unlink(missing_ok=True)
                    removed += 1
    return removed
