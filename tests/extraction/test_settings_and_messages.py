"""`spidr-fast extract` never mixes settings in one folder, and says what to do when something is off."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import spidr_fast
from spidr_fast import checkpoint as checkpoint_module
from spidr_fast.__main__ import main
from spidr_fast.data.audio import standardize
from spidr_fast.extraction import FeatureExtractor
from tests.extraction.conftest import tiny_model, write_audio


def extract(*args: object) -> int:
    return main(["extract", *map(str, args), "--no-progress"])


def mtimes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.rglob("*.npy")}


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same architecture as `checkpoint`, other weights."""
    return spidr_fast.save_model(tiny_model(seed=1), tmp_path_factory.mktemp("other") / "model.pt")


def test_rerun_with_other_settings_is_refused_and_overwrite_recomputes(
    corpus: Path, checkpoint: Path, other_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    assert extract(corpus, out, "--checkpoint", checkpoint, "--layer", 2) == 0
    settings = json.loads((out / "extract_settings.json").read_text())
    assert settings["layers"] == [2] and settings["dtype"] == "float32" and settings["units"] is None
    assert len(settings["checkpoint"]["weights_sha256"]) == 64 and "config_sha256" in settings["checkpoint"]
    before = mtimes(out)
    capsys.readouterr()
    assert extract(corpus, out, "--checkpoint", checkpoint, "--layer", 2) == 0  # same settings: skipped
    assert "0 written, 7 already complete" in capsys.readouterr().err

    for change, named in [
        (("--checkpoint", other_checkpoint), "checkpoint.weights_sha256: "),
        (("--checkpoint", checkpoint, "--units", "heads"), "units: null -> heads"),
        (("--checkpoint", checkpoint, "--dtype", "bfloat16"), "dtype: float32 -> bfloat16"),
        (("--checkpoint", checkpoint, "--after-residual"), "features: FFN output (before residual) -> layer output"),
        (("--checkpoint", checkpoint, "--format", "pt"), "format: npy -> pt"),
    ]:
        assert extract(corpus, out, "--layer", 2, *change) == 2
        err = capsys.readouterr().err
        assert named in err and "--overwrite" in err and "Traceback" not in err, err
        assert mtimes(out) == before  # nothing touched
    assert extract(corpus, out, "--checkpoint", other_checkpoint, "--layer", 2, "--units", "heads") == 2
    err = capsys.readouterr().err
    assert "checkpoint.weights_sha256" in err and "units:" in err and "units_layer: null -> 2" in err

    # --overwrite: every output recomputed with the other weights, old outputs (other names) gone.
    assert extract(corpus, out, "--checkpoint", other_checkpoint, "--layer", 2, "--units", "heads", "--overwrite") == 0
    assert "7 written, 0 already complete" in capsys.readouterr().err
    assert not (out / "top.npy").exists()
    wave = torch.from_numpy(standardize(sf.read(corpus / "top.wav", dtype="float32")[0]))
    with torch.no_grad():
        expected = spidr_fast.load_model(other_checkpoint).get_intermediate_outputs(wave[None])[1][0].numpy()
    np.testing.assert_allclose(np.load(out / "top.layer2.npy"), expected, atol=1e-4)
    assert extract(corpus, out, "--checkpoint", other_checkpoint, "--layer", 2, "--units", "heads") == 0
    assert "0 written, 7 already complete" in capsys.readouterr().err


def test_outputs_without_a_settings_record_are_not_trusted(
    corpus: Path, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    assert extract(corpus, out, "--checkpoint", checkpoint, "--layer", 1) == 0
    (out / "extract_settings.json").unlink()  # e.g. a folder from before the record existed
    assert extract(corpus, out, "--checkpoint", checkpoint, "--layer", 1) == 2
    assert "no extract_settings.json" in capsys.readouterr().err
    assert extract(corpus, out, "--checkpoint", checkpoint, "--layer", 1, "--overwrite") == 0
    assert (out / "extract_settings.json").is_file()


def test_conversions_may_be_added_on_a_rerun(corpus: Path, checkpoint: Path, tmp_path: Path) -> None:
    """--resample/--downmix change no 16 kHz mono output: adding them rescues files, it is no conflict."""
    write_audio(corpus / "tel.wav", 4000, sample_rate=8000)
    out = tmp_path / "out"
    assert extract(corpus, out, "--checkpoint", checkpoint, "--layer", 1) == 1
    assert extract(corpus, out, "--checkpoint", checkpoint, "--layer", 1, "--resample") == 0
    assert (out / "tel.npy").is_file()
    assert json.loads((out / "extract_settings.json").read_text())["resample"] is True
    assert extract(corpus, out, "--checkpoint", checkpoint, "--layer", 1) == 0  # converted outputs kept


def test_units_only_without_units_layer(corpus: Path, checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert extract(corpus, out, "--checkpoint", checkpoint, "--units-only", "--units", "heads", "--layer", 3) == 0
    wave = np.asarray(sf.read(corpus / "top.wav", dtype="float32")[0])
    expected = FeatureExtractor(tiny_model(), layers=[], units="heads", units_layer=3)([wave])[0]["units"]
    np.testing.assert_array_equal(np.load(out / "top.npy"), expected.numpy())
    assert json.loads((out / "extract_settings.json").read_text())["units_layer"] == 3
    with pytest.raises(ValueError, match="give units_layer"):
        FeatureExtractor(tiny_model(), layers=[], units="heads")


def test_units_only_default_layer_error_is_one_clear_line(
    corpus: Path, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert extract(corpus, tmp_path / "out", "--checkpoint", checkpoint, "--units-only", "--units", "codebooks") == 2
    err = capsys.readouterr().err.strip()
    assert err == "spidr-fast extract: error: units for layer 6: only layers 2..3 have a head and codebook"


def test_errors_say_what_to_do_and_summary_counts_extracted_audio(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    corpus = tmp_path / "corpus"
    write_audio(corpus / "good.wav", 16000)
    write_audio(corpus / "tel.wav", 80000, sample_rate=8000)  # 10 s, not extracted
    write_audio(corpus / "stereo.wav", np.zeros((32000, 2)) + 0.1)
    write_audio(corpus / "zeros.wav", np.zeros(8000))
    out = tmp_path / "out"
    assert extract(corpus, out, "--checkpoint", checkpoint, "--layer", 1) == 1
    failures = {Path(f["path"]).name: f["reason"] for f in map(json.loads, (out / "failures.jsonl").open())}
    assert failures == {
        "tel.wav": "sample rate 8000 Hz, expected 16000 Hz: pass --resample to convert it",
        "stereo.wav": "2 channels, expected mono: pass --downmix to average them",
    }
    err = capsys.readouterr().err
    assert "--resample to convert it" in err and "--downmix to average them" in err
    assert re.search(r"1\.5 s of audio \(0\.000 h\) extracted", err), err  # good.wav + zeros.wav only
    assert re.search(r"warning: 1 silent file\(s\).*\n\s+\S*zeros\.wav", err), err
    assert np.load(out / "zeros.npy").shape == (24, 32)  # written all the same


def test_offline_released_model_is_one_line(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setitem(checkpoint_module.RELEASED_URLS, "spidr_base", "http://127.0.0.1:9/spidr_base.pt")
    assert extract(corpus, tmp_path / "out", "--checkpoint", "spidr_base") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("spidr-fast extract: error: could not download"), err
    assert "--checkpoint /path/to/spidr_base.pt" in err[0]


def test_checkpoint_without_config_says_how_to_give_it(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    model = tiny_model()
    bare = spidr_fast.save_model(model, tmp_path / "bare" / "model.pt", write_config=False)
    assert extract(corpus, tmp_path / "out", "--checkpoint", bare, "--layer", 1) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no config.json beside" in err[0] and "--config" in err[0], err
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(model.cfg.to_dict()))
    out = tmp_path / "out2"
    assert extract(corpus, out, "--checkpoint", bare, "--config", config, "--layer", 1) == 0
    settings = json.loads((out / "extract_settings.json").read_text())
    assert "config_sha256" in settings["checkpoint"]


def test_files_sharing_an_output_name_fail_and_the_others_are_written(
    corpus: Path, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    write_audio(corpus / "clip.wav", 3000)
    write_audio(corpus / "clip.flac", 3000, seed=1)  # both would be OUT/clip.npy
    out = tmp_path / "out"
    assert extract(corpus, out, "--checkpoint", checkpoint, "--layer", 1) == 1
    failures = {Path(f["path"]).name: f["reason"] for f in map(json.loads, (out / "failures.jsonl").open())}
    assert sorted(failures) == ["clip.flac", "clip.wav"]
    assert "'clip' is also that of" in failures["clip.wav"] and failures["clip.wav"].endswith(
        "clip.flac: rename one of them"
    )
    assert not (out / "clip.npy").exists() and len(list(out.rglob("*.npy"))) == 7
    assert "7 written, 0 already complete (skipped), 2 failed" in capsys.readouterr().err


def test_a_run_that_fails_before_extracting_leaves_the_folder_as_it_was(
    corpus: Path, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    bare = spidr_fast.save_model(tiny_model(), tmp_path / "bare" / "model.pt", write_config=False)
    out = tmp_path / "out"
    assert extract(corpus, out, "--checkpoint", bare, "--layer", 1) == 2  # no config: nothing recorded
    assert not (out / "extract_settings.json").exists()
    assert extract(corpus, out, "--checkpoint", bare, "--config", checkpoint.parent / "config.json", "--layer", 1) == 0
    assert extract(corpus, out, "--checkpoint", bare, "--layer", 1, "--units", "heads", "--overwrite") == 2
    assert len(list(out.rglob("*.npy"))) == 7  # the failed --overwrite deleted nothing
    capsys.readouterr()
    assert extract(corpus, out, "--checkpoint", bare, "--layer", 1) == 2
    assert "checkpoint.config_sha256: " in capsys.readouterr().err  # recorded with the config, now without
