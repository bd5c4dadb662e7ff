"""`spidr-fast manifest` on a real-world folder: bad files listed (not fatal), honest duration, warnings."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from spidr_fast.__main__ import main
from spidr_fast.data.manifest import read_manifest, scan_folder


@pytest.fixture
def mixed(tmp_path: Path, tone: Callable[..., Path]) -> Path:
    root = tmp_path / "mixed"
    tone(root / "a" / "good.wav", 16000)  # 1 s
    tone(root / "a" / "tel.wav", 8000, sample_rate=8000)  # 1 s at 8 kHz
    tone(root / "b" / "stereo.flac", 4800, channels=2)  # 0.3 s
    tone(root / "clip.wav", 3200)  # 0.2 s, and clip.ogg below: both are id "clip"
    tone(root / "clip.ogg", 4800, sample_rate=24000, fmt="OGG")  # 0.2 s at 24 kHz
    sf.write(root / "empty.wav", np.zeros(0, dtype=np.float32), 16_000)
    (root / "notes.wav").write_text("not audio at all")
    (root / "cut.flac").write_bytes((root / "a" / "good.wav").read_bytes()[:20])
    return root


def test_bad_files_are_listed_and_the_good_ones_written(mixed: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "m.csv"
    assert main(["manifest", str(mixed), str(out), "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    entries = read_manifest(out)
    assert sorted(e.fileid for e in entries) == ["a/good", "a/tel", "b/stereo", "clip", "clip"]
    failures = {Path(f["path"]).name: f["reason"] for f in map(json.loads, (tmp_path / "m.failures.jsonl").open())}
    assert sorted(failures) == ["cut.flac", "empty.wav", "notes.wav"]
    assert failures["empty.wav"] == "empty (0 samples)"
    assert failures["notes.wav"].startswith("unreadable header") and failures["cut.flac"].startswith("unreadable")
    listed = [line.split(": ")[0].strip() for line in captured.err.splitlines() if line.startswith("    ")]
    assert sorted(Path(p).name for p in listed) == sorted(failures)  # each bad file named once in the summary
    # 1 + 1 + 0.3 + 0.2 + 0.2 s, each file at its own rate (16 kHz for all gave 2.3 s)
    assert "5 utterances, 2.7 s (0.00 h)" in captured.out
    assert "3 file(s) are not 16 kHz mono (1 at 8000 Hz, 1 at 24000 Hz, 1 with several channels)" in captured.err
    assert "1 id(s) are shared by several files (2 files; e.g. clip: clip.ogg, clip.wav)" in captured.err

    # Fixed folder: exit 0, and the failures file of the previous run is gone.
    for name in failures:
        (mixed / name).unlink()
    assert main(["manifest", str(mixed), str(out), "--no-progress"]) == 0
    assert not (tmp_path / "m.failures.jsonl").exists()


def test_tar_members_and_only_bad_files(mixed: Path, tmp_path: Path, capsys) -> None:
    archive = tmp_path / "mixed.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(mixed, arcname="mixed")
    out = tmp_path / "tar.jsonl"
    assert main(["manifest", str(archive), str(out), "--no-progress"]) == 1
    assert len(read_manifest(out)) == 5
    bad = [json.loads(line)["path"] for line in (tmp_path / "tar.failures.jsonl").open()]
    assert sorted(bad) == [f"{archive}:mixed/{n}" for n in ("cut.flac", "empty.wav", "notes.wav")]

    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.wav").write_text("nothing")
    capsys.readouterr()
    assert main(["manifest", str(only_bad), str(tmp_path / "none.csv"), "--no-progress"]) == 1
    assert not (tmp_path / "none.csv").exists() and "x.wav: unreadable" in capsys.readouterr().err
    assert main(["manifest", str(mixed / "a" / "good.wav"), str(tmp_path / "w.csv"), "--no-progress"]) == 2
    assert "not an uncompressed tar" in capsys.readouterr().err


def test_scan_folder_still_raises_on_the_first_bad_file(mixed: Path) -> None:
    with pytest.raises(ValueError, match=r"cut\.flac: unreadable header"):
        scan_folder(mixed, progress=False)
