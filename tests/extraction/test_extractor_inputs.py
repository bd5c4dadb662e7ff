"""`FeatureExtractor` takes audio as the CLI does: any sample rate (resampled), stereo only with downmix, one array."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from spidr_fast.__main__ import main
from spidr_fast.extraction import FeatureExtractor
from spidr_fast.extraction.files import resample_audio
from tests.extraction.conftest import tiny_model, write_audio


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0)


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
    return FeatureExtractor(tiny_model(), layers=[2], units="heads", max_batch_seconds=1.0)


def test_sample_rate_is_resampled_as_the_cli_does(checkpoint: Path, tmp_path: Path) -> None:
    path = write_audio(tmp_path / "in" / "tel.wav", 4000, sample_rate=8000, subtype="FLOAT")
    wave, rate = sf.read(path, dtype="float32")
    out = tmp_path / "out"
    args = ["extract", path, out, "--checkpoint", checkpoint, "--layer", 2, "--resample", "--no-progress"]
    assert main([str(a) for a in args]) == 0
    api = FeatureExtractor(tiny_model(), layers=[2])  # the `checkpoint` fixture's weights
    got = api(wave, sample_rate=rate)["layer2"]
    assert got.shape[0] == (8000 - 400) // 320 + 1  # 0.5 s at 16 kHz
    np.testing.assert_allclose(got.numpy(), np.load(out / "tel.npy"), atol=1e-5)
    assert_same(api(wave, sample_rate=8000), api(resample_audio(wave, 8000, 16000)))


def test_two_dimensional_input_needs_downmix(extractor: FeatureExtractor) -> None:
    rng = np.random.default_rng(0)
    stereo = (0.1 * rng.standard_normal((3000, 2))).astype(np.float32)  # (samples, channels), as soundfile gives
    with pytest.raises(ValueError, match=r"waveforms\[0\]: 2 channels, expected mono: pass downmix=True"):
        extractor([stereo])
    with pytest.raises(ValueError, match=r"shape \(2, 3000\).*list of 1-D waveforms.*downmix=True"):
        extractor(torch.from_numpy(stereo.T))  # (channels, samples), as torchaudio gives
    mono = stereo.mean(axis=1)
    expected = extractor([mono])[0]
    assert_same(extractor([stereo], downmix=True)[0], expected)
    assert_same(extractor(torch.from_numpy(stereo.T), downmix=True), expected)
    assert_same(extractor(mono[None]), expected)  # (1, samples) is mono: no downmix needed


def test_one_waveform_is_one_utterance(extractor: FeatureExtractor) -> None:
    wave = (0.1 * np.random.default_rng(1).standard_normal(5000)).astype(np.float32)
    single = extractor(wave)
    assert isinstance(single, dict) and single["units"].shape == (15,)
    assert_same(single, extractor([wave])[0])
    assert_same(extractor(torch.from_numpy(wave)), single)
    half = torch.from_numpy(wave).to(torch.bfloat16)  # any float dtype: converted to float32 first
    assert_same(extractor(half), extractor(half.float().numpy()))
