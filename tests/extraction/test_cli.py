"""`spidr-fast extract`: layout, formats, bad inputs, resume, SIGKILL, ranks, parity with the reference."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import spidr_fast
from spidr_fast.__main__ import main
from spidr_fast.data.audio import standardize
from spidr_fast.data.manifest import scan_tar, write_manifest
from spidr_fast.extraction.files import list_inputs, shard
from tests.extraction.conftest import TINY, write_audio
from tests.sigkill import kill_mid_run


def extract(*args: object) -> int:
    # Not GPU tests: the CLI defaults to CUDA + bf16 when present, and these compare with CPU fp32 at 1e-4.
    return main(["extract", *map(str, args), "--no-progress", "--device", "cpu"])


def outputs(folder: Path) -> dict[str, np.ndarray | bytes]:
    """Every file under `folder` by relative path (temp files included): arrays for .npy, else bytes."""
    return {
        p.relative_to(folder).as_posix(): np.load(p) if p.suffix == ".npy" else p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def audio_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix in (".wav", ".flac"))


def test_help(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["extract", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--checkpoint", "--layer", "--units", "--format", "--max-batch-seconds", "--resample", "--downmix"):
        assert flag in text


def test_layout_and_values(corpus: Path, checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert extract(corpus, out, "--checkpoint", checkpoint, "--layer", 2, "--max-batch-seconds", 1) == 0
    model = spidr_fast.load_model(checkpoint)
    written = outputs(out)
    expected_names = {f.relative_to(corpus).with_suffix(".npy").as_posix() for f in audio_files(corpus)}
    assert set(written) == expected_names | {"failures.jsonl", "extract_settings.json"}
    assert (out / "failures.jsonl").read_text() == ""
    for f in audio_files(corpus):
        wave, _ = sf.read(f, dtype="float32")
        with torch.no_grad():
            ref = model.get_intermediate_outputs(torch.from_numpy(standardize(wave))[None])[1][0].numpy()
        got = np.load(out / f.relative_to(corpus).with_suffix(".npy"))
        assert got.dtype == np.float32 and got.shape == ref.shape
        np.testing.assert_allclose(got, ref, atol=1e-4)


def test_several_arrays_pt_manifest_and_single_file(corpus: Path, checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "npy"
    assert extract(corpus, out, "--checkpoint", checkpoint, "--layer", 1, "--layer", 3, "--units", "codebooks") == 0
    key = "spk1/sess/utt1"
    layer1, layer3, units = (np.load(out / f"{key}.{n}.npy") for n in ("layer1", "layer3", "units"))
    assert layer1.shape == layer3.shape == (units.shape[0], TINY["encoder_embed_dim"]) and units.dtype == np.int64

    manifest = tmp_path / "list.jsonl"
    files = audio_files(corpus)[:2]
    manifest.write_text(
        "".join(
            json.dumps({"fileid": f"m/{i}", "path": str(f), "num_samples": -1}) + "\n" for i, f in enumerate(files)
        )
    )
    pt = tmp_path / "pt"
    assert extract(manifest, pt, "--checkpoint", checkpoint, "--layer", 3, "--units", "heads", "--format", "pt") == 0
    saved = torch.load(pt / "m" / "0.pt")
    assert sorted(saved) == ["layer3", "units"] and saved["units"].dtype == torch.int64

    single = tmp_path / "single"
    assert extract(files[0], single, "--checkpoint", checkpoint, "--layer", 1) == 0
    assert (single / f"{files[0].stem}.npy").is_file()


def test_bad_inputs_are_reported_and_good_files_written(corpus: Path, checkpoint: Path, tmp_path: Path) -> None:
    bad = corpus / "bad"
    rng = np.random.default_rng(0)
    write_audio(bad / "stereo.wav", 0.1 * rng.standard_normal((4000, 2)))
    write_audio(bad / "rate8k.wav", 4000, sample_rate=8000)
    write_audio(bad / "short.wav", 399)
    write_audio(bad / "empty.wav", np.zeros(0))
    nan = 0.1 * rng.standard_normal(4000)
    nan[100] = np.nan
    write_audio(bad / "nan.wav", nan, subtype="FLOAT")
    inf = 0.1 * rng.standard_normal(4000)
    inf[7] = np.inf
    write_audio(bad / "inf.wav", inf, subtype="FLOAT")
    (bad / "text.wav").write_text("not audio at all")
    data = (corpus / "top.wav").read_bytes()
    (bad / "truncated.wav").write_bytes(data[:30])  # a header cut short
    (bad / "notes.txt").write_text("ignored: not an audio extension")

    out = tmp_path / "out"
    assert extract(corpus, out, "--checkpoint", checkpoint, "--layer", 1) == 1
    failures = {Path(f["path"]).name: f["reason"] for f in map(json.loads, (out / "failures.jsonl").open())}
    assert set(failures) == {
        "stereo.wav",
        "rate8k.wav",
        "short.wav",
        "empty.wav",
        "nan.wav",
        "inf.wav",
        "text.wav",
        "truncated.wav",
    }
    assert "channels" in failures["stereo.wav"]
    assert "sample rate 8000" in failures["rate8k.wav"]
    assert "too short" in failures["short.wav"]
    assert "empty" in failures["empty.wav"] or "unreadable" in failures["empty.wav"]
    assert "NaN or Inf" in failures["nan.wav"] and "NaN or Inf" in failures["inf.wav"]
    assert "unreadable" in failures["text.wav"] and "unreadable" in failures["truncated.wav"]
    good = {f.relative_to(corpus).with_suffix(".npy").as_posix() for f in audio_files(corpus) if f.parent != bad}
    assert set(outputs(out)) - {"failures.jsonl", "extract_settings.json"} == good

    # Conversions happen only on request: --downmix and --resample rescue those two files.
    assert extract(corpus, out, "--checkpoint", checkpoint, "--layer", 1, "--downmix", "--resample") == 1
    failures = {Path(f["path"]).name for f in map(json.loads, (out / "failures.jsonl").open())}
    assert failures == {"short.wav", "empty.wav", "nan.wav", "inf.wav", "text.wav", "truncated.wav"}
    assert np.load(out / "bad" / "rate8k.npy").shape[0] == (8000 - 400) // 320 + 1  # 0.25 s at 16 kHz


def test_rerun_skips_complete_and_redoes_partial(
    corpus: Path, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    assert extract(corpus, out, "--checkpoint", checkpoint, "--layer", 1) == 0
    clean = outputs(out)
    partial = out / "spk0" / "sess" / "utt0.npy"
    partial.write_bytes(partial.read_bytes()[:-7])  # a partial file (e.g. copied by hand)
    stale = out / "top.npy"
    (out / ".top.npy.abc123.tmp").write_bytes(b"left by a killed run")
    stale_mtime = stale.stat().st_mtime_ns
    capsys.readouterr()
    assert extract(corpus, out, "--checkpoint", checkpoint, "--layer", 1) == 0
    assert "1 written" in capsys.readouterr().err
    assert stale.stat().st_mtime_ns == stale_mtime  # complete: not rewritten
    assert set(outputs(out)) == set(clean)
    np.testing.assert_allclose(np.load(partial), clean["spk0/sess/utt0.npy"], atol=1e-5)


def _cli(*args: object, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "spidr_fast", "extract", *map(str, args), "--no-progress", "--num-workers", "1"]
    cmd += ["--device", "cpu"]  # not GPU tests (see `extract`)
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}  # 2 shared cores: no thread oversubscription
    return subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE)


def test_sigkill_then_rerun_equals_clean_run(checkpoint: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "many"
    for i in range(60):
        write_audio(corpus / f"d{i % 3}" / f"u{i:02d}.wav", 16000 + 97 * i, seed=i)
    args = ("--checkpoint", checkpoint, "--layer", 2, "--max-batch-seconds", 1.2, "--units", "heads")
    killed = tmp_path / "killed"
    kill_mid_run(_cli(corpus, killed, *args), lambda: len(list(killed.rglob("*.npy"))) >= 2)
    assert len(list(killed.rglob("*.npy"))) < 120  # killed mid-run
    assert _cli(corpus, killed, *args).wait() == 0

    clean = tmp_path / "clean"
    assert _cli(corpus, clean, *args).wait() == 0
    after, expected = outputs(killed), outputs(clean)
    assert set(after) == set(expected)  # same files, no temp left
    for name, array in expected.items():
        if name.endswith(".npy"):
            np.testing.assert_allclose(after[name], array, atol=1e-5)


def test_two_ranks_write_disjoint_sets_covering_all(corpus: Path, checkpoint: Path, tmp_path: Path) -> None:
    for i in range(10):
        write_audio(corpus / "more" / f"x{i}.wav", 2000 + 100 * i, seed=i)
    out = tmp_path / "out"
    procs = [
        _cli(corpus, out, "--checkpoint", checkpoint, "--layer", 1, env={"RANK": str(r), "WORLD_SIZE": "2"})
        for r in range(2)
    ]
    logs = [p.communicate()[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    written = []
    for rank, log in enumerate(logs):
        assert f"rank {rank}/2" in log
        written.append(int(re.search(r"(\d+) written", log).group(1)))
    files = {p.relative_to(out).as_posix() for p in out.rglob("*.npy")}
    expected = {f.relative_to(corpus).with_suffix(".npy").as_posix() for f in audio_files(corpus)}
    assert files == expected
    assert sum(written) == len(expected) and min(written) > 0  # each file once, both ranks worked
    assert {p.name for p in out.glob("failures*.jsonl")} == {"failures.rank0.jsonl", "failures.rank1.jsonl"}


def test_cli_reproduces_reference_on_its_checkpoint(corpus: Path, tmp_path: Path) -> None:
    pytest.importorskip("spidr")
    from spidr.config import SpidRConfig
    from spidr.models import SpidR

    torch.manual_seed(1)
    config = SpidRConfig(**TINY)
    ref = SpidR(config).eval()
    path = tmp_path / "ref" / "model.pt"
    path.parent.mkdir()
    torch.save({"model": ref.state_dict()}, path)
    (path.parent / "config.json").write_text(json.dumps(dataclasses.asdict(config)))
    out = tmp_path / "out"
    assert extract(corpus, out, "--checkpoint", path, "--layer", 3, "--units", "heads") == 0
    for f in audio_files(corpus):
        wave = torch.from_numpy(standardize(sf.read(f, dtype="float32")[0]))[None]
        with torch.no_grad():
            layer3 = ref.get_intermediate_outputs(wave)[2][0].numpy()
            units = ref.get_codebooks(wave, onehot=True)[2].reshape(-1, TINY["codebook_size"]).argmax(-1).numpy()
        stem = out / f.relative_to(corpus).with_suffix("")
        np.testing.assert_allclose(np.load(f"{stem}.layer3.npy"), layer3, atol=1e-4)
        np.testing.assert_array_equal(np.load(f"{stem}.units.npy"), units)


def test_shards_depend_on_the_key_only(corpus: Path) -> None:
    inputs = list_inputs(corpus)
    for world in (1, 2, 3):
        parts = [shard(inputs, rank, world) for rank in range(world)]
        assert sorted(i.key for p in parts for i in p) == sorted(i.key for i in inputs)  # covering, disjoint
        # A rank that restarts on a grown (or shrunk) input list keeps the same files.
        assert all(set(shard(inputs[:3], r, world)) <= set(parts[r]) for r in range(world))


def test_tar_members_from_a_manifest(corpus: Path, checkpoint: Path, tmp_path: Path) -> None:
    archive = tmp_path / "corpus.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(corpus, arcname="corpus")
    manifest = write_manifest(scan_tar(archive, progress=False), tmp_path / "tar.csv")
    out = tmp_path / "out"
    assert extract(manifest, out, "--checkpoint", checkpoint, "--layer", 1) == 0
    for f in audio_files(corpus):
        key = Path("corpus") / f.relative_to(corpus).with_suffix(".npy")
        wave = torch.from_numpy(standardize(sf.read(f, dtype="float32")[0]))[None]
        with torch.no_grad():
            expected = spidr_fast.load_model(checkpoint).get_intermediate_outputs(wave)[0][0].numpy()
        np.testing.assert_allclose(np.load(out / key), expected, atol=1e-4)
