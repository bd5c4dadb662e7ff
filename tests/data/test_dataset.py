"""Audio checks and the dataset: every bad input gives its named error; skip_bad logs and counts."""

import logging
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from spidr_fast.data.audio import AudioError, load_audio, standardize
from spidr_fast.data.dataset import SpeechDataset
from spidr_fast.data.manifest import scan_folder, scan_tar


def test_load_audio_standardises(audio_dir: Path) -> None:
    for p in ["a/u1.wav", "a/u2.flac", "b/u4.ogg"]:
        x = load_audio(audio_dir / p)
        assert x.dtype == np.float32 and x.ndim == 1
        assert abs(float(x.mean())) < 1e-5 and abs(float(x.var()) - 1) < 1e-3
    raw = load_audio(audio_dir / "u5.wav", normalize=False)
    expected = torch.nn.functional.layer_norm(torch.from_numpy(raw), raw.shape).numpy()
    np.testing.assert_allclose(standardize(raw), expected, atol=1e-5)


def bad_files(root: Path, write_tone: Callable[..., Path]) -> dict[str, tuple[Path, str]]:
    """Each bad input and the words its error must contain."""
    nan = np.zeros(1000, dtype=np.float32)
    nan[10] = np.nan
    sf.write(root / "nan.wav", nan, 16_000, subtype="FLOAT")
    inf = np.zeros(1000, dtype=np.float32)
    inf[3] = np.inf
    sf.write(root / "inf.wav", inf, 16_000, subtype="FLOAT")
    sf.write(root / "empty.wav", np.zeros(0, dtype=np.float32), 16_000)
    (root / "garbage.wav").write_bytes(b"RIFF not really a wav")
    return {
        "rate": (write_tone(root / "rate.wav", 2000, sample_rate=8000), "sample rate 8000"),
        "stereo": (write_tone(root / "stereo.wav", 2000, channels=2), "2 channels"),
        "short": (write_tone(root / "short.wav", 399), "too short: 399"),
        "empty": (root / "empty.wav", "empty"),
        "garbage": (root / "garbage.wav", "unreadable"),
        "missing": (root / "missing.wav", "unreadable"),
        "nan": (root / "nan.wav", "NaN or Inf"),
        "inf": (root / "inf.wav", "NaN or Inf"),
    }


@pytest.mark.parametrize("kind", ["rate", "stereo", "short", "empty", "garbage", "missing", "nan", "inf"])
def test_bad_audio_named_error(tmp_path: Path, kind: str, tone: Callable[..., Path]) -> None:
    path, words = bad_files(tmp_path, tone)[kind]
    with pytest.raises(AudioError, match=words) as info:
        load_audio(path)
    assert info.value.source == str(path) and str(path) in str(info.value)


def test_exactly_400_samples_is_fine(tmp_path: Path, tone: Callable[..., Path]) -> None:
    assert load_audio(tone(tmp_path / "ok.wav", 400)).shape == (400,)


def test_dataset_from_files_and_tar(audio_dir: Path, tmp_path: Path) -> None:
    files = SpeechDataset(scan_folder(audio_dir, progress=False))
    with tarfile.open(tmp_path / "c.tar", "w") as tar:
        for p in sorted(audio_dir.rglob("*.*")):
            tar.add(p, arcname=p.relative_to(audio_dir).as_posix())
    archived = SpeechDataset(scan_tar(tmp_path / "c.tar", progress=False))
    assert len(files) == len(archived) == 5
    for i in range(5):
        a, b = files[i], archived[(i, 3)]
        assert b.index == i and b.epoch == 3
        torch.testing.assert_close(a.waveform, b.waveform)
        assert a.waveform.shape[0] == files.lengths[i]


def test_dataset_raises_or_skips_with_a_log(
    audio_dir: Path, caplog: pytest.LogCaptureFixture, tone: Callable[..., Path]
) -> None:
    entries = scan_folder(audio_dir, progress=False)
    tone(audio_dir / "a" / "u1.wav", 4000, sample_rate=22_050)  # now bad (after the scan)
    with pytest.raises(AudioError, match=r"u1\.wav: sample rate 22050"):
        SpeechDataset(entries)[0]
    lenient = SpeechDataset(entries, skip_bad=True)
    with caplog.at_level(logging.WARNING):
        items = [lenient[i] for i in range(5)]
    assert items[0].waveform is None and all(u.waveform is not None for u in items[1:])
    assert lenient.num_skipped == 1 and "u1.wav" in caplog.text and "sample rate" in caplog.text


def test_stale_manifest_is_an_error(audio_dir: Path, tone: Callable[..., Path]) -> None:
    entries = scan_folder(audio_dir, progress=False)
    tone(audio_dir / "u5.wav", 5000)
    with pytest.raises(AudioError, match="manifest says 6000"):
        SpeechDataset(entries)[4]


def test_worker_raises_or_skips_without_hanging(audio_dir: Path, tone: Callable[..., Path]) -> None:
    from torch.utils.data import DataLoader

    from spidr_fast.config import DataConfig
    from spidr_fast.data.batching import BucketBatchSampler, Collator

    entries = scan_folder(audio_dir, progress=False)
    tone(audio_dir / "b" / "u3.wav", 5200, channels=2)  # bad after the scan
    cfg = DataConfig(num_buckets=4, min_sample_size=2000, max_sample_size=8000, max_batch_length=8000)

    def loader(skip_bad: bool) -> DataLoader:
        dataset = SpeechDataset(entries, skip_bad=skip_bad)
        sampler = BucketBatchSampler(dataset.lengths, cfg)
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=Collator(cfg), num_workers=1, timeout=60)

    with pytest.raises(AudioError, match=r"u3\.wav: 2 channels"):
        list(loader(skip_bad=False))
    batches = list(loader(skip_bad=True))
    assert sum(b.num_skipped for b in batches) == 1
    assert sum(b.waveforms.shape[0] for b in batches) == 4
