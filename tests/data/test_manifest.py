"""Manifests: every form round-trips; folder and tar scans count samples from headers; CLI."""

import tarfile
from pathlib import Path

import pytest
import soundfile as sf

from spidr_fast.__main__ import main as cli_main
from spidr_fast.data.manifest import ManifestEntry, read_manifest, scan_folder, scan_tar, write_manifest


def test_scan_folder_counts_samples(audio_dir: Path) -> None:
    entries = scan_folder(audio_dir, progress=False)
    assert [e.fileid for e in entries] == ["a/u1", "a/u2", "b/u3", "b/u4", "u5"]
    assert [e.num_samples for e in entries] == [4000, 3000, 5200, 2500, 6000]
    assert all(Path(e.path).is_file() for e in entries)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".tsv"])
def test_file_manifest_round_trips(audio_dir: Path, tmp_path: Path, suffix: str) -> None:
    entries = scan_folder(audio_dir, progress=False)
    path = write_manifest(entries, tmp_path / f"m{suffix}", root=audio_dir)
    back = read_manifest(path)
    if suffix == ".tsv":  # fairseq TSV keeps the relative path only: it becomes the fileid
        assert path.read_text().splitlines()[0] == str(audio_dir)
        assert [e.fileid for e in back] == [str(Path(e.path).relative_to(audio_dir)) for e in entries]
        assert [(e.path, e.num_samples) for e in back] == [(e.path, e.num_samples) for e in entries]
    else:
        assert back == entries
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temporary file


def make_tar(audio_dir: Path, out: Path) -> Path:
    with tarfile.open(out, "w") as tar:
        for p in sorted(audio_dir.rglob("*.*")):
            tar.add(p, arcname=p.relative_to(audio_dir).as_posix())
        info = tarfile.TarInfo("notes.txt")
        tar.addfile(info)
    return out


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_tar_manifest_round_trips_and_addresses_bytes(audio_dir: Path, tmp_path: Path, suffix: str) -> None:
    archive = make_tar(audio_dir, tmp_path / "corpus.tar")
    entries = scan_tar(archive, progress=False)
    assert [e.fileid for e in entries] == ["a/u1", "a/u2", "b/u3", "b/u4", "u5"]
    assert [e.num_samples for e in entries] == [4000, 3000, 5200, 2500, 6000]
    raw = archive.read_bytes()
    for e in entries:  # the byte range is exactly the member file
        assert raw[e.byte_offset : e.byte_offset + e.byte_size] == (audio_dir / e.path).read_bytes()
    path = write_manifest(entries, tmp_path / f"tar{suffix}")
    assert read_manifest(path) == entries
    if suffix == ".csv":
        assert path.read_text().splitlines()[0] == "fileid,path,num_samples,archive,byte_offset,byte_size"


def test_tsv_refuses_archives_and_bad_forms(tmp_path: Path) -> None:
    entry = ManifestEntry("x", "x.wav", 10, archive="a.tar", byte_offset=0, byte_size=1)
    with pytest.raises(ValueError, match="TSV"):
        write_manifest([entry], tmp_path / "m.tsv")
    with pytest.raises(ValueError, match="suffix"):
        write_manifest([entry], tmp_path / "m.txt")
    bad = tmp_path / "bad.tsv"
    bad.write_text("/no/such/root\nx.wav\t10\n")
    with pytest.raises(ValueError, match="root folder"):
        read_manifest(bad)
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("fileid,path\nx,x.wav\n")
    with pytest.raises(ValueError, match="num_samples"):
        read_manifest(bad_csv)


def test_compressed_tar_is_refused(audio_dir: Path, tmp_path: Path) -> None:
    archive = tmp_path / "c.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(audio_dir / "u5.wav", arcname="u5.wav")
    with pytest.raises(ValueError, match="uncompressed"):
        scan_tar(archive, progress=False)


@pytest.mark.parametrize("source", ["dir", "tar"])
def test_cli_writes_manifest(audio_dir: Path, tmp_path: Path, source: str, capsys: pytest.CaptureFixture) -> None:
    src = audio_dir if source == "dir" else make_tar(audio_dir, tmp_path / "c.tar")
    out = tmp_path / "out" / "m.csv"
    assert cli_main(["manifest", str(src), str(out), "--no-progress"]) == 0
    entries = read_manifest(out)
    assert len(entries) == 5 and sum(e.num_samples for e in entries) == 20700
    assert "5 utterances" in capsys.readouterr().out
    one = entries[0]
    if source == "dir":
        assert sf.info(one.path).frames == one.num_samples
