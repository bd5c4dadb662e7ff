"""Issue 13's "done when": a folder of mixed good and bad audio through manifest and extract, as a user runs them."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

from tests.extraction.conftest import write_audio


def cli(*args: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-c",
        "import os, sys; os.umask(0o022); from spidr_fast.__main__ import main; sys.exit(main())",
        *map(str, args),
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_mixed_folder_through_manifest_and_extract(checkpoint: Path, tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    rng = np.random.default_rng(0)
    write_audio(root / "spk1" / "a.wav", 16000)
    write_audio(root / "spk1" / "b.flac", 9000, seed=1)
    write_audio(root / "spk2" / "tel.wav", 8000, sample_rate=8000)  # 8 kHz
    write_audio(root / "spk2" / "stereo.wav", 0.1 * rng.standard_normal((6000, 2)))
    write_audio(root / "spk2" / "silence.wav", np.zeros(4000))
    nan = 0.1 * rng.standard_normal(4000)
    nan[5] = np.nan
    write_audio(root / "spk3" / "nan.wav", nan, subtype="FLOAT")
    sf.write(root / "spk3" / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    (root / "spk3" / "text.wav").write_text("not audio")

    manifest = tmp_path / "corpus.csv"
    made = cli("manifest", root, manifest, "--no-progress")
    assert made.returncode == 1 and "Traceback" not in made.stderr, made.stderr
    assert "6 utterances" in made.stdout and "2 file(s) are not 16 kHz mono" in made.stderr
    left_out = [json.loads(line)["path"] for line in (tmp_path / "corpus.failures.jsonl").read_text().splitlines()]
    assert sorted(Path(p).name for p in left_out) == ["empty.wav", "text.wav"]

    out = tmp_path / "features"
    args = ("--checkpoint", checkpoint, "--layer", 2, "--units", "heads", "--no-progress", "--num-workers", 1)
    run = cli("extract", manifest, out, *args)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert sorted(Path(f["path"]).name for f in failures) == ["nan.wav", "stereo.wav", "tel.wav"]  # each once
    assert "silent" in run.stderr and "silence.wav" in run.stderr
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.npy"))
    assert written == [f"spk{k}.{n}.npy" for k in ("1/a", "1/b", "2/silence") for n in ("layer2", "units")]
    for path in [*out.rglob("*.npy"), out / "failures.jsonl", out / "extract_settings.json", manifest]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path  # readable by colleagues
        if path.suffix == ".npy":
            np.load(path)

    rescued = cli("extract", manifest, out, *args, "--resample", "--downmix")  # conversions: no conflict
    assert rescued.returncode == 1 and "2 written, 3 already complete" in rescued.stderr, rescued.stderr
    refused = cli("extract", manifest, out, *args, "--dtype", "bfloat16")
    assert refused.returncode == 2 and "dtype: float32 -> bfloat16" in refused.stderr
    assert "Traceback" not in refused.stderr
