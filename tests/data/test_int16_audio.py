"""PCM16 audio decoded as int16 and standardised on the device (issue 12 item 4): the same batches, masks and
training losses as the float path, to 1e-5; float formats stay on the float path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from spidr_fast import SpidR
from spidr_fast.config import DataConfig, MaskingConfig, OptimizerConfig
from spidr_fast.data.audio import IntAudio, int16_stats, load_audio, standardize, standardize_on_device
from spidr_fast.data.batching import Collator
from spidr_fast.data.dataset import SpeechDataset
from spidr_fast.data.manifest import ManifestEntry
from spidr_fast.train.config import read_config
from spidr_fast.train.optim import build_optimizer
from spidr_fast.train.step import StepContext, train_step

CROPPED = DataConfig(num_buckets=4, min_sample_size=2000, max_sample_size=12_000, max_batch_length=40_000)


def write(path: Path, num_samples: int, seed: int, subtype: str | None = None, fmt: str | None = None) -> Path:
    rng = np.random.default_rng(seed)
    t = np.arange(num_samples) / 16_000
    x = 0.01 * seed + 0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(num_samples)  # with a DC offset
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, x.astype(np.float32), 16_000, subtype=subtype, format=fmt)
    return path


@pytest.fixture
def pcm16(tmp_path: Path) -> list[ManifestEntry]:
    """PCM16 WAV and FLAC utterances."""
    files = [
        write(tmp_path / "a.wav", 9000, 1, "PCM_16"),
        write(tmp_path / "b.flac", 11_000, 2, "PCM_16"),
        write(tmp_path / "c.wav", 12_500, 3, "PCM_16"),
    ]
    return [ManifestEntry(f.stem, str(f), sf.info(f).frames) for f in files]


def test_pcm16_decodes_as_int16_with_stats_equal_to_the_float_path(pcm16: list[ManifestEntry]) -> None:
    for entry in pcm16:
        got = load_audio(entry.path, integer=True)
        assert isinstance(got, IntAudio) and got.samples.dtype == np.int16
        want = load_audio(entry.path)  # today's path: float32 decoding, standardised on the host
        standardised = standardize_on_device(
            torch.from_numpy(got.samples)[None], "cpu", torch.tensor([got.mean]), torch.tensor([got.scale])
        )[0]
        assert standardised.dtype == torch.float32
        torch.testing.assert_close(standardised, torch.from_numpy(want), atol=1e-5, rtol=0)


def test_int16_stats_match_standardize_on_a_long_loud_utterance() -> None:
    rng = np.random.default_rng(0)
    x = np.clip(rng.normal(800, 9000, 2_000_000), -32768, 32767).astype(np.int16)
    mean, scale = int16_stats(x)
    want = standardize(x.astype(np.float32) / 32768)
    np.testing.assert_allclose((x - mean) * scale, want, atol=1e-5, rtol=0)


def test_float_formats_stay_on_the_float_path(tmp_path: Path) -> None:
    for path in (write(tmp_path / "f.wav", 5000, 4, "FLOAT"), write(tmp_path / "g.ogg", 5000, 5, fmt="OGG")):
        got = load_audio(path, integer=True)
        assert isinstance(got, np.ndarray) and got.dtype == np.float32
        np.testing.assert_array_equal(got, load_audio(path))
    pcm = write(tmp_path / "h.wav", 5000, 6, "PCM_16")
    assert isinstance(load_audio(pcm, integer=True, normalize=False), np.ndarray)  # raw audio: float as before


def test_same_batch_through_both_paths(pcm16: list[ManifestEntry]) -> None:
    collate = Collator(CROPPED, MaskingConfig(mask_length=3))
    keys = [(0, 2), (1, 2), (2, 2)]
    floats = collate([SpeechDataset(pcm16)[k] for k in keys])
    ints = collate([SpeechDataset(pcm16, integer=True)[k] for k in keys])
    assert ints.waveforms.dtype == torch.int16 and floats.waveforms.dtype == torch.float32
    assert ints.waveforms.element_size() * 2 == floats.waveforms.element_size()
    assert ints.mean.shape == ints.scale.shape == (3,) and floats.mean is None
    torch.testing.assert_close(ints.mask_indices, floats.mask_indices, rtol=0, atol=0)  # same crops, same masks
    torch.testing.assert_close(ints.device_waveforms("cpu"), floats.device_waveforms("cpu"), atol=1e-5, rtol=0)


def test_a_batch_mixing_pcm16_and_float_audio_is_standardised_on_the_host(
    pcm16: list[ManifestEntry], tmp_path: Path
) -> None:
    ogg = write(tmp_path / "d.ogg", 10_000, 7, fmt="OGG")
    entries = [*pcm16, ManifestEntry("d", str(ogg), sf.info(ogg).frames)]
    collate = Collator(CROPPED, MaskingConfig(mask_length=3))
    ints = collate([SpeechDataset(entries, integer=True)[(i, 0)] for i in range(4)])
    floats = collate([SpeechDataset(entries)[(i, 0)] for i in range(4)])
    assert ints.waveforms.dtype == torch.float32 and ints.mean is None
    torch.testing.assert_close(ints.waveforms, floats.waveforms, atol=1e-5, rtol=0)


def test_int16_without_stats_is_refused() -> None:
    with pytest.raises(ValueError, match="mean and scale"):
        standardize_on_device(torch.zeros(1, 400, dtype=torch.int16), "cpu")


def make_step() -> StepContext:
    cfg = read_config("tiny", ["model.encoder_dropout=0.0", "model.encoder_attention_dropout=0.0"]).model
    torch.manual_seed(0)
    model = SpidR(cfg).train()
    optimizer, scheduler = build_optimizer(model, OptimizerConfig(warmup_steps=0))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return StepContext(model, model, optimizer, scheduler, params, 10.0, torch.device("cpu"), torch.float32, 1.0)


def test_a_training_step_gives_the_same_loss(pcm16: list[ManifestEntry]) -> None:
    collate = Collator(CROPPED, MaskingConfig(mask_length=3))
    keys = [(0, 1), (1, 1), (2, 1)]
    floats = collate([SpeechDataset(pcm16)[k] for k in keys])
    ints = collate([SpeechDataset(pcm16, integer=True)[k] for k in keys])
    assert ints.waveforms.dtype == torch.int16
    want = train_step(make_step(), floats.waveforms, floats.mask_indices, 1)
    got = train_step(make_step(), ints.device_waveforms("cpu"), ints.mask_indices, 1)
    torch.testing.assert_close(got["loss"], want["loss"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["grad_norm"], want["grad_norm"], atol=1e-5, rtol=1e-4)
    # One way to standardise an int16 batch (Batch.device_waveforms): train_step refuses raw int16 samples.
    with pytest.raises(ValueError, match=r"torch.int16.*device_waveforms"):
        train_step(make_step(), ints.waveforms, ints.mask_indices, 1)


def test_loader_bench_writes_both_paths_side_by_side(tmp_path: Path) -> None:
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import loader_throughput

    out = tmp_path / "loader.jsonl"
    assert loader_throughput.main(["--seconds", "6", "--repeats", "1", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["format"], r["path"], r["waveform_dtype"]) for r in rows] == [
        ("PCM16 WAV", "float32", "float32"),
        ("PCM16 WAV", "int16", "int16"),
        ("PCM16 FLAC", "float32", "float32"),
        ("PCM16 FLAC", "int16", "int16"),
    ]
    assert all(r["audio_s"] >= 6 and r["audio_s_per_s_per_core"] > 0 and "--seconds 6" in r["command"] for r in rows)
    assert [r["waveform_bytes_per_audio_s"] for r in rows] == [64_000, 32_000] * 2
