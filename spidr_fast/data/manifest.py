"""Write a manifest of the audio under a folder or inside an uncompressed tar.

Forms (chosen by the output suffix), the reference recipe's:
- `.csv`: header `fileid,path,num_samples`; for tar members also `archive,byte_offset,byte_size`
  (the member's data offset and size inside the uncompressed tar; `path` is its name there).
- `.tsv` (fairseq): first line the root folder, then `relative_path<TAB>num_samples`; reading
  gives fileid = relative path and path = root/relative path. Files only, not tar members.
- `.jsonl`: one object per line with the CSV's fields.
Sample counts come from file headers (`soundfile.info`), without decoding. Writes are atomic.

`spidr-fast manifest` goes past bad files (unreadable header, fewer samples than one frame): the
good ones are written, the bad ones listed with their reasons in `OUT_STEM.failures.jsonl` and
the summary, and the exit status is 1. The summary gives the duration at each file's own sample
rate and warns, with counts, of files that are not 16 kHz mono and of ids shared by several files.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from spidr_fast.config import SAMPLE_RATE
from spidr_fast.data.audio import AudioError, soundfile
from spidr_fast.framing import RECEPTIVE_FIELD
from spidr_fast.io import atomic_write_text, write_failures

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")
_FILE_FIELDS = ["fileid", "path", "num_samples"]
_ARCHIVE_FIELDS = [*_FILE_FIELDS, "archive", "byte_offset", "byte_size"]


@dataclass(frozen=True)
class ManifestEntry:
    """One utterance: a file (`path`), or a member of an uncompressed tar (`archive` + byte range)."""

    fileid: str
    path: str
    num_samples: int
    archive: str | None = None
    byte_offset: int | None = None
    byte_size: int | None = None

    @property
    def in_archive(self) -> bool:
        return self.archive is not None

    @property
    def name(self) -> str:
        """How errors name this utterance."""
        return f"{self.archive}:{self.path}" if self.archive is not None else self.path


def write_manifest(entries: Iterable[ManifestEntry], path: str | Path, *, root: str | Path | None = None) -> Path:
    """Write `entries` to `path` in the form its suffix names (.csv, .tsv, .jsonl), atomically.

    `root` (TSV only) is the first line; by default the deepest folder holding every file.
    """
    path = Path(path)
    entries = list(entries)
    archived = any(e.in_archive for e in entries)
    if path.suffix == ".csv":
        buf = io.StringIO()
        fields = _ARCHIVE_FIELDS if archived else _FILE_FIELDS
        writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(asdict(e) for e in entries)
        text = buf.getvalue()
    elif path.suffix == ".jsonl":
        fields = _ARCHIVE_FIELDS if archived else _FILE_FIELDS
        text = "".join(json.dumps({k: asdict(e)[k] for k in fields}) + "\n" for e in entries)
    elif path.suffix == ".tsv":
        if archived:
            raise ValueError(f"{path}: a TSV manifest cannot address tar members; write .csv or .jsonl")
        base = (
            Path(root) if root is not None else Path(os.path.commonpath([str(Path(e.path).parent) for e in entries]))
        )
        lines = [str(base)]
        for e in entries:
            rel = os.path.relpath(e.path, base)
            if rel.startswith(".."):
                raise ValueError(f"{path}: {e.path} is not under the root {base}")
            lines.append(f"{rel}\t{e.num_samples}")
        text = "\n".join(lines) + "\n"
    else:
        raise ValueError(f"{path}: unknown manifest suffix {path.suffix!r} (use .csv, .tsv or .jsonl)")
    atomic_write_text(path, text)
    return path


def read_manifest(path: str | Path) -> list[ManifestEntry]:
    """Read a .csv, .tsv (fairseq) or .jsonl manifest."""
    path = Path(path)
    if path.suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        missing = set(_FILE_FIELDS) - set(rows[0] if rows else _FILE_FIELDS)
        if missing:
            raise ValueError(f"{path}: missing CSV columns {sorted(missing)}")
        return [_entry(row, path) for row in rows]
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            return [_entry(json.loads(line), path) for line in f if line.strip()]
    if path.suffix == ".tsv":
        with path.open(encoding="utf-8") as f:
            root = Path(f.readline().rstrip("\n"))
            if not root.is_dir():
                raise ValueError(f"{path}: first line must be the dataset's root folder, got {str(root)!r}")
            entries = []
            for lineno, line in enumerate(f, start=2):
                if not line.strip():
                    continue
                rel, _, count = line.rstrip("\n").rpartition("\t")
                if not rel:
                    raise ValueError(f"{path}:{lineno}: expected 'relative_path<TAB>num_samples'")
                entries.append(ManifestEntry(fileid=rel, path=str(root / rel), num_samples=int(count)))
            return entries
    raise ValueError(f"{path}: unknown manifest suffix {path.suffix!r} (use .csv, .tsv or .jsonl)")


def _entry(row: dict, source: Path) -> ManifestEntry:
    def opt_int(key: str) -> int | None:
        value = row.get(key)
        return None if value in (None, "") else int(value)

    try:
        archive = row.get("archive") or None
        return ManifestEntry(
            fileid=str(row["fileid"]),
            path=str(row["path"]),
            num_samples=int(row["num_samples"]),
            archive=None if archive is None else str(archive),
            byte_offset=opt_int("byte_offset"),
            byte_size=opt_int("byte_size"),
        )
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{source}: bad manifest row {row!r} ({exc})") from exc


class _ByteRange(io.RawIOBase):
    """A read-only window [offset, offset + size) of an open file: soundfile reads a tar member's header in place."""

    def __init__(self, f: io.BufferedReader, offset: int, size: int) -> None:
        self._f, self._offset, self._size, self._pos = f, offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = min(max(0, base + pos), self._size)
        return self._pos

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), self._size - self._pos)
        self._f.seek(self._offset + self._pos)
        got = self._f.readinto(memoryview(buffer)[:n])
        self._pos += got or 0
        return got or 0


@dataclass
class Scan:
    """What a scan found: usable entries with each one's (sample rate, channels), and the files left out."""

    entries: list[ManifestEntry] = field(default_factory=list)
    formats: list[tuple[int, int]] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)

    def add(self, source: Path | io.RawIOBase, name: str, make: Callable[[int], ManifestEntry]) -> None:
        """Read `source`'s header: an entry (`make(num_samples)`), or a failure naming `name`."""
        sf = soundfile()  # outside the try: a missing soundfile is no file's fault
        try:
            info = sf.info(source)
        except Exception as exc:
            self.failures.append((name, f"unreadable header ({type(exc).__name__}: {exc})"))
            return
        if info.frames < RECEPTIVE_FIELD:
            short = f"too short: {info.frames} samples < {RECEPTIVE_FIELD} (one frame)"
            self.failures.append((name, short if info.frames else "empty (0 samples)"))
            return
        self.entries.append(make(int(info.frames)))
        self.formats.append((int(info.samplerate), int(info.channels)))

    def strict(self) -> list[ManifestEntry]:
        """The entries; `AudioError` for the first file left out."""
        if self.failures:
            raise AudioError(*self.failures[0])
        return self.entries


def scan_folder(
    root: str | Path, *, extensions: tuple[str, ...] = AUDIO_EXTENSIONS, progress: bool = True
) -> list[ManifestEntry]:
    """Entries for every audio file under `root` (sorted), fileid = relative path without suffix.

    Raises `AudioError` for an unreadable file or one shorter than a frame (`scan_source` lists them instead).
    """
    return _scan_folder(Path(root).resolve(), extensions, progress).strict()


def scan_tar(
    archive: str | Path, *, extensions: tuple[str, ...] = AUDIO_EXTENSIONS, progress: bool = True
) -> list[ManifestEntry]:
    """Entries for every audio member of an uncompressed tar, with their data byte ranges (errors as `scan_folder`)."""
    return _scan_tar(Path(archive).resolve(), extensions, progress).strict()


def scan_source(source: str | Path, *, extensions: tuple[str, ...] = AUDIO_EXTENSIONS, progress: bool = True) -> Scan:
    """Scan a folder or an uncompressed tar, going past bad files: they are listed in `Scan.failures`."""
    source = Path(source)
    if source.is_dir():
        return _scan_folder(source.resolve(), extensions, progress)
    if source.is_file():
        return _scan_tar(source.resolve(), extensions, progress)
    raise FileNotFoundError(f"{source} is neither a folder nor a file")


def _scan_folder(root: Path, extensions: tuple[str, ...], progress: bool) -> Scan:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in extensions and p.is_file())
    scan = Scan()
    for p in tqdm(files, desc=f"scan {root.name}", unit="file", disable=not progress):
        fileid = p.relative_to(root).with_suffix("").as_posix()
        scan.add(p, str(p), lambda n, fileid=fileid, p=p: ManifestEntry(fileid=fileid, path=str(p), num_samples=n))
    return scan


def _scan_tar(archive: Path, extensions: tuple[str, ...], progress: bool) -> Scan:
    try:
        # "r:" refuses compressed tars: byte offsets must address raw member bytes. Closed by `with tar` below.
        tar = tarfile.open(archive, mode="r:")  # noqa: SIM115
    except tarfile.ReadError as exc:
        raise ValueError(f"{archive}: not an uncompressed tar ({exc})") from exc
    scan = Scan()
    with tar, archive.open("rb") as raw:
        bar = tqdm(
            desc=f"scan {archive.name}", unit="B", unit_scale=True, total=archive.stat().st_size, disable=not progress
        )
        for member in _members(tar, bar):
            if not member.isfile() or Path(member.name).suffix.lower() not in extensions:
                continue

            def make(n: int, member: tarfile.TarInfo = member) -> ManifestEntry:
                return ManifestEntry(
                    fileid=Path(member.name).with_suffix("").as_posix(),
                    path=member.name,
                    num_samples=n,
                    archive=str(archive),
                    byte_offset=member.offset_data,
                    byte_size=member.size,
                )

            scan.add(_ByteRange(raw, member.offset_data, member.size), f"{archive}:{member.name}", make)
        bar.close()
    return scan


def _members(tar: tarfile.TarFile, bar: tqdm) -> Iterator[tarfile.TarInfo]:
    for member in tar:
        bar.update(member.offset_data + member.size - bar.n)
        yield member


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `spidr-fast manifest`."""
    parser.add_argument("source", type=Path, help="folder of audio files, or an uncompressed .tar")
    parser.add_argument("out", type=Path, help="manifest to write: .csv, .tsv (folders only) or .jsonl")
    parser.add_argument("--ext", default=",".join(AUDIO_EXTENSIONS), help="audio suffixes (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    """Scan `args.source` and write `args.out`; returns the exit status (1 when files were left out)."""
    extensions = tuple(e if e.startswith(".") else f".{e}" for e in args.ext.lower().split(",") if e)
    failures_file = args.out.with_name(f"{args.out.stem}.failures.jsonl")
    try:
        scan = scan_source(args.source, extensions=extensions, progress=not args.no_progress)
        if not scan.entries and not scan.failures:
            raise ValueError(f"no {'/'.join(extensions)} audio in {args.source}")
        if scan.entries:
            write_manifest(scan.entries, args.out, root=args.source.resolve() if args.source.is_dir() else None)
        if scan.failures:
            write_failures(failures_file, scan.failures)
        else:
            failures_file.unlink(missing_ok=True)  # a previous run's
    except (ValueError, OSError) as exc:
        print(f"spidr-fast manifest: error: {exc}", file=sys.stderr)
        return 2
    _report(scan, args.out, failures_file)
    return 1 if scan.failures else 0


def _report(scan: Scan, out: Path, failures_file: Path) -> None:
    """The summary: duration at each file's own rate, warnings on formats and ids, the files left out."""
    if scan.entries:
        seconds = sum(e.num_samples / rate for e, (rate, _) in zip(scan.entries, scan.formats))
        print(f"wrote {out}: {len(scan.entries)} utterances, {seconds:.1f} s ({seconds / 3600:.2f} h)")
    else:
        print(f"spidr-fast manifest: no usable audio: {out} not written", file=sys.stderr)
    rates = Counter(rate for rate, _ in scan.formats if rate != SAMPLE_RATE)
    multi = sum(channels > 1 for _, channels in scan.formats)
    if rates or multi:
        odd = sum(rate != SAMPLE_RATE or channels > 1 for rate, channels in scan.formats)
        kinds = [f"{n} at {rate} Hz" for rate, n in sorted(rates.items())]
        kinds += [f"{multi} with several channels"] if multi else []
        print(
            f"warning: {odd} file(s) are not {SAMPLE_RATE // 1000} kHz mono ({', '.join(kinds)}): extract them with "
            "--resample / --downmix; training needs 16 kHz mono",
            file=sys.stderr,
        )
    ids = Counter(e.fileid for e in scan.entries)
    shared = {fileid: n for fileid, n in ids.items() if n > 1}
    if shared:
        example = next(iter(shared))
        paths = [Path(e.path).name for e in scan.entries if e.fileid == example]
        print(
            f"warning: {len(shared)} id(s) are shared by several files ({sum(shared.values())} files; e.g. {example}: "
            f"{', '.join(paths)}): extract fails such files (they share an output name), rename them",
            file=sys.stderr,
        )
    if scan.failures:
        lines = [f"spidr-fast manifest: {len(scan.failures)} file(s) left out, listed in {failures_file}:"]
        lines += [f"    {path}: {reason}" for path, reason in scan.failures[:20]]
        if len(scan.failures) > 20:
            lines.append(f"    ... and {len(scan.failures) - 20} more")
        print("\n".join(lines), file=sys.stderr)
