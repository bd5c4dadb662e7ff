"""Write a manifest of the audio under a folder or inside an uncompressed tar.

Forms (chosen by the output suffix), the reference recipe's:
- `.csv`: header `fileid,path,num_samples`; for tar members also `archive,byte_offset,byte_size`
  (the member's data offset and size inside the uncompressed tar; `path` is its name there).
- `.tsv` (fairseq): first line the root folder, then `relative_path<TAB>num_samples`; reading
  gives fileid = relative path and path = root/relative path. Files only, not tar members.
- `.jsonl`: one object per line with the CSV's fields.
Sample counts come from file headers (`soundfile.info`), without decoding. Writes are atomic.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from spidr_fast.data.audio import SAMPLE_RATE, AudioError, soundfile

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


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and `os.replace`.

    A reader never sees a half-written file, and an interrupted run leaves the old file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def scan_folder(
    root: str | Path, *, extensions: tuple[str, ...] = AUDIO_EXTENSIONS, progress: bool = True
) -> list[ManifestEntry]:
    """Entries for every audio file under `root` (sorted), fileid = relative path without suffix."""
    root = Path(root).resolve()
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in extensions and p.is_file())
    entries = []
    for p in tqdm(files, desc=f"scan {root.name}", unit="file", disable=not progress):
        entries.append(
            ManifestEntry(
                fileid=p.relative_to(root).with_suffix("").as_posix(), path=str(p), num_samples=_frames(p, str(p))
            )
        )
    return entries


def scan_tar(
    archive: str | Path, *, extensions: tuple[str, ...] = AUDIO_EXTENSIONS, progress: bool = True
) -> list[ManifestEntry]:
    """Entries for every audio member of an uncompressed tar, with their data byte ranges."""
    archive = Path(archive).resolve()
    try:
        # "r:" refuses compressed tars: byte offsets must address raw member bytes. Closed by `with tar` below.
        tar = tarfile.open(archive, mode="r:")  # noqa: SIM115
    except tarfile.ReadError as exc:
        raise ValueError(f"{archive}: not an uncompressed tar ({exc})") from exc
    entries = []
    with tar, archive.open("rb") as raw:
        bar = tqdm(
            desc=f"scan {archive.name}", unit="B", unit_scale=True, total=archive.stat().st_size, disable=not progress
        )
        for member in _members(tar, bar):
            if not member.isfile() or Path(member.name).suffix.lower() not in extensions:
                continue
            window = _ByteRange(raw, member.offset_data, member.size)
            entries.append(
                ManifestEntry(
                    fileid=Path(member.name).with_suffix("").as_posix(),
                    path=member.name,
                    num_samples=_frames(window, f"{archive}:{member.name}"),
                    archive=str(archive),
                    byte_offset=member.offset_data,
                    byte_size=member.size,
                )
            )
        bar.close()
    return entries


def _members(tar: tarfile.TarFile, bar: tqdm) -> Iterator[tarfile.TarInfo]:
    for member in tar:
        bar.update(member.offset_data + member.size - bar.n)
        yield member


def _frames(source: Path | io.RawIOBase, name: str) -> int:
    sf = soundfile()
    try:
        return int(sf.info(source).frames)
    except Exception as exc:
        raise AudioError(name, f"unreadable header ({type(exc).__name__}: {exc})") from exc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `spidr-fast manifest`."""
    parser.add_argument("source", type=Path, help="folder of audio files, or an uncompressed .tar")
    parser.add_argument("out", type=Path, help="manifest to write: .csv, .tsv (folders only) or .jsonl")
    parser.add_argument("--ext", default=",".join(AUDIO_EXTENSIONS), help="audio suffixes (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    """Scan `args.source` and write `args.out`; returns the exit status."""
    extensions = tuple(e if e.startswith(".") else f".{e}" for e in args.ext.lower().split(",") if e)
    if args.source.is_dir():
        entries = scan_folder(args.source, extensions=extensions, progress=not args.no_progress)
        root = args.source.resolve()
    elif args.source.is_file():
        entries = scan_tar(args.source, extensions=extensions, progress=not args.no_progress)
        root = None
    else:
        raise SystemExit(f"spidr-fast manifest: {args.source} is neither a folder nor a file")
    if not entries:
        raise SystemExit(f"spidr-fast manifest: no {'/'.join(extensions)} audio in {args.source}")
    write_manifest(entries, args.out, root=root)
    hours = sum(e.num_samples for e in entries) / SAMPLE_RATE / 3600
    print(f"wrote {args.out}: {len(entries)} utterances, {hours:.2f} h at {SAMPLE_RATE} Hz")
    return 0
