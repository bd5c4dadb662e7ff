"""`FeatureExtractor`: batched and chunked extraction equals each utterance alone, units as documented."""

from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np
import pytest
import torch

import spidr_fast
from spidr_fast.data.audio import standardize
from spidr_fast.extraction import FeatureExtractor, plan_pieces
from spidr_fast.framing import HOP, RECEPTIVE_FIELD, num_frames
from tests.extraction.conftest import TINY, tiny_model

# Not GPU tests: pin the extractor to the CPU (its default is CUDA when present, where these fp32
# tolerances do not hold). The CUDA test below passes device="cuda" itself.
FeatureExtractor = functools.partial(FeatureExtractor, device="cpu")

LENGTHS = [400, 719, 720, 1234, 3200, 8000, 16000, 5555]


def waves(lengths: list[int] = LENGTHS, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(0.3 * rng.standard_normal(n) + 0.05).astype(np.float32) for n in lengths]


def alone(model: spidr_fast.DinoSR, wave: np.ndarray, **kw: object) -> list[torch.Tensor]:
    with torch.no_grad():
        return [y[0] for y in model.get_intermediate_outputs(torch.from_numpy(standardize(wave))[None], **kw)]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-4) -> None:
    assert actual.shape == expected.shape
    err = (actual - expected).abs().max().item()
    assert err <= tol * max(1.0, expected.abs().max().item()), f"max error {err:.3g}"


@pytest.mark.parametrize("mode", ["layer_norm", "group_norm"])
@pytest.mark.parametrize("batch_seconds", [0.05, 1.0, 100.0])
@pytest.mark.parametrize("channels_last", [True, False])
def test_batched_equals_single(mode: str, batch_seconds: float, channels_last: bool) -> None:
    model = tiny_model(extractor_mode=mode)
    if mode == "group_norm" and channels_last:
        with pytest.raises(ValueError, match="layer_norm"):
            FeatureExtractor(model, layers=[1], channels_last_frontend=True)
        return
    extractor = FeatureExtractor(
        model, layers=[1, 2, 3], max_batch_seconds=batch_seconds, channels_last_frontend=channels_last
    )
    inputs = waves()
    outputs = extractor([torch.from_numpy(w) if i % 2 else w for i, w in enumerate(inputs)])  # numpy and torch
    for wave, out in zip(inputs, outputs):
        expected = alone(model, wave)
        assert sorted(out) == ["layer1", "layer2", "layer3"]
        for layer in (1, 2, 3):
            assert out[f"layer{layer}"].dtype == torch.float32
            assert out[f"layer{layer}"].shape[0] == num_frames(len(wave))
            assert_close(out[f"layer{layer}"], expected[layer - 1])


@pytest.mark.parametrize("presorted", [True, False])
def test_cpu_workers_equal_one_worker(presorted: bool) -> None:
    """Batches on two worker threads: same results in the same order, torch's thread count restored."""
    model = tiny_model()
    inputs = waves(LENGTHS * 3, seed=1)
    threads = torch.get_num_threads()
    one = FeatureExtractor(model, layers=[2], units="heads", max_batch_seconds=0.3, cpu_workers=1)
    two = FeatureExtractor(model, layers=[2], units="heads", max_batch_seconds=0.3, cpu_workers=2)
    expected = list(one.stream(enumerate(inputs), presorted=presorted, window=2))
    got = list(two.stream(enumerate(inputs), presorted=presorted, window=2))
    assert torch.get_num_threads() == threads
    assert [key for key, _ in got] == [key for key, _ in expected]
    assert sorted(key for key, _ in got) == list(range(len(inputs)))
    for (_, g), (_, e) in zip(got, expected):
        assert_close(g["layer2"], e["layer2"], tol=1e-5)
        assert torch.equal(g["units"], e["units"])
    with pytest.raises(ValueError, match="cpu_workers"):
        FeatureExtractor(model, layers=[2], cpu_workers=0)


def test_cpu_workers_run_a_lone_batch_inline_with_all_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers take batches with one thread each; a batch with nothing beside it runs inline, all threads."""
    import threading

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        extractor = FeatureExtractor(tiny_model(), layers=[2], max_batch_seconds=0.3, cpu_workers=2)
        seen: list[tuple[bool, int]] = []
        run = extractor._run_splitting

        def spy(batch: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
            seen.append((threading.current_thread() is threading.main_thread(), torch.get_num_threads()))
            return run(batch)

        monkeypatch.setattr(extractor, "_run_splitting", spy)
        extractor(waves([4000]))
        assert seen == [(True, 2)]
        seen.clear()
        extractor(waves([4000] * 4))
        assert len(seen) == 4 and all(not main and n == 1 for main, n in seen), seen
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_after_residual_and_early_stop() -> None:
    model = tiny_model()
    extractor = FeatureExtractor(model, layers=[2], before_residual=False, max_batch_seconds=0.5, device="cpu")
    assert extractor.depth == 2  # layer 3 is never computed
    for wave, out in zip(waves(), extractor(waves())):
        assert list(out) == ["layer2"]
        assert_close(out["layer2"], alone(model, wave, before_residual=False)[1])


@pytest.mark.parametrize("model_type", ["spidr", "dinosr"])
@pytest.mark.parametrize("layer", [2, 3])
def test_head_units_are_get_codebooks_argmax(model_type: str, layer: int) -> None:
    model = tiny_model(model_type)
    extractor = FeatureExtractor(model, layers=[1], units="heads", units_layer=layer, max_batch_seconds=0.5)
    for wave, out in zip(waves(), extractor(waves())):
        with torch.no_grad():
            probs = model.get_codebooks(torch.from_numpy(standardize(wave))[None], onehot=True)[layer - 1]
        assert out["units"].dtype == torch.int64
        assert torch.equal(out["units"], probs.reshape(-1, TINY["codebook_size"]).argmax(-1))


def test_codebook_units_are_nearest_codewords() -> None:
    model = tiny_model()
    extractor = FeatureExtractor(model, layers=[3], units="codebooks", max_batch_seconds=0.5)
    codebook = model.codebooks[1].codebook / model.codebooks[1].counts[:, None]  # layer 3 = last codebook
    for wave, out in zip(waves(), extractor(waves())):
        x = alone(model, wave)[2]
        x = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5)  # instance norm over time
        dist = torch.cdist(x.double(), codebook.double())  # (T, K)
        got = dist.gather(1, out["units"][:, None])[:, 0]
        # Compare distances, not indices: ties and rounding cannot fail the test.
        assert torch.all(got <= dist.min(1).values + 1e-4)


def test_units_only_and_argument_errors() -> None:
    model = tiny_model()
    out = FeatureExtractor(model, layers=[], units="heads", units_layer=3)(waves([2000]))[0]
    assert list(out) == ["units"]
    with pytest.raises(ValueError, match="layer 4 does not exist"):
        FeatureExtractor(model, layers=[4])
    with pytest.raises(ValueError, match=r"only layers 2\.\.3 have a head"):
        FeatureExtractor(model, layers=[1], units="heads")
    with pytest.raises(ValueError, match=r"waveforms\[0\]: too short: 399 samples < 400 \(one frame\)"):
        FeatureExtractor(model, layers=[1])(waves([399]))
    with pytest.raises(ValueError, match="conv kernels and strides"):
        FeatureExtractor(tiny_model(extractor_conv_layer_config=[[16, 10, 4]] + [[16, 3, 2]] * 6), layers=[1])


@pytest.mark.parametrize("total", [1, 2, 50, 119, 120, 121, 1000])
def test_pieces_cover_every_frame_once(total: int) -> None:
    samples = (total - 1) * HOP + RECEPTIVE_FIELD + 123
    pieces = plan_pieces(samples, chunk_frames=40, overlap_frames=10)
    kept = []
    for p in pieces:
        assert p.start % HOP == 0 and 0 <= p.keep_from < p.keep_to <= num_frames(p.stop - p.start)
        kept += [p.start // HOP + j for j in range(p.keep_from, p.keep_to)]
    assert kept == list(range(total))
    assert len(pieces) == (1 if total <= 60 else -(-total // 40))


def test_chunked_long_file() -> None:
    model = tiny_model()
    wave = waves([16000 * 12])[0]
    whole = alone(model, wave)[0]
    chunked = FeatureExtractor(model, layers=[1], chunk_seconds=2.0, overlap_seconds=1.0, max_batch_seconds=5)
    out = chunked([wave])[0]["layer1"]
    assert out.shape == whole.shape
    # Frames more than the positional conv's reach + attention away from a cut differ only by
    # attention context; close to the whole-file result but not equal.
    rel = ((out - whole).norm(dim=-1) / whole.norm(dim=-1)).mean().item()
    assert 0 < rel < 0.5
    # With enough overlap to see the whole file, a file is one piece: exact.
    exact = FeatureExtractor(model, layers=[1], chunk_seconds=2.0, overlap_seconds=10.0)([wave])[0]["layer1"]
    assert_close(exact, whole)


def test_bfloat16_close_to_float32() -> None:
    model = tiny_model()
    ref = FeatureExtractor(model, layers=[3])(waves())
    low = FeatureExtractor(model, layers=[3], dtype="bfloat16")(waves())
    for a, b in zip(low, ref):
        assert a["layer3"].dtype == torch.float32
        rel = (a["layer3"] - b["layer3"]).norm() / b["layer3"].norm()
        assert rel < 0.05


def test_reference_model_parity(tmp_path: object) -> None:
    """A model built by the reference package, saved in its format, gives the reference's outputs."""
    pytest.importorskip("spidr")
    from spidr.config import SpidRConfig
    from spidr.models import SpidR

    torch.manual_seed(0)
    config = SpidRConfig(**TINY)
    ref = SpidR(config).eval()
    path = tmp_path / "ref.pt"
    torch.save({"model": ref.state_dict()}, path)
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(config)))  # the reference's full config
    model = spidr_fast.load_model(path)
    outputs = FeatureExtractor(model, layers=[1, 3], units="heads", max_batch_seconds=0.5)(waves())
    for wave, out in zip(waves(), outputs):
        with torch.no_grad():
            expected = ref.get_intermediate_outputs(torch.from_numpy(standardize(wave))[None])
            onehot = ref.get_codebooks(torch.from_numpy(standardize(wave))[None], onehot=True)[2]
        assert_close(out["layer1"], expected[0][0])
        assert_close(out["layer3"], expected[2][0])
        assert torch.equal(out["units"], onehot.reshape(-1, TINY["codebook_size"]).argmax(-1))


def test_out_of_memory_splits_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model()
    extractor = FeatureExtractor(model, layers=[2], max_batch_seconds=100)
    run_batch = extractor._run_batch
    sizes = []

    def flaky(waves: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        sizes.append(len(waves))
        if len(waves) > 2:
            raise torch.OutOfMemoryError("simulated")
        return run_batch(waves)

    monkeypatch.setattr(extractor, "_run_batch", flaky)
    for wave, out in zip(waves(), extractor(waves())):
        assert_close(out["layer2"], alone(model, wave)[1])
    assert sizes[:3] == [len(LENGTHS), len(LENGTHS) // 2, len(LENGTHS) // 4]  # halved until it fits


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_cuda_batched_and_low_precision(dtype: str) -> None:
    model = tiny_model()
    expected = FeatureExtractor(model, layers=[3], device="cpu")(waves())
    model = tiny_model()
    extractor = FeatureExtractor(model, layers=[3], units="heads", device="cuda", dtype=dtype, max_batch_seconds=1)
    # cuDNN runs fp32 convolutions in TF32 unless told not to (torch.backends.cudnn.allow_tf32, on by
    # default): ~1e-3 off the CPU. The 1e-4 bound is for true fp32, so TF32 is off for that case.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=dtype != "float32"):
        got = extractor(waves())
    for g, e in zip(got, expected):
        assert g["layer3"].device.type == "cpu" and g["layer3"].dtype == torch.float32
        rel = ((g["layer3"] - e["layer3"]).norm() / e["layer3"].norm()).item()
        assert rel < (1e-4 if dtype == "float32" else 0.05), rel  # bf16 measured 1.3% on the base config


@pytest.mark.parametrize("samples", [400, 719, 1040, 1360, 4321])
@pytest.mark.parametrize("tiling", [{}, {"tile_frames": 1}, {"tile_frames": 7}, {"tile_frames": 5, "tiled_blocks": 7}])
def test_channels_last_frontend_equals_the_model(samples: int, tiling: dict) -> None:
    """Whole and time-tiled (tiles of 1 frame, odd tiles, every block tiled) front-ends equal the model's."""
    from spidr_fast.extraction.frontend import ChannelsLastFrontend

    model = tiny_model()
    x = torch.randn(3, samples)
    with torch.no_grad():
        expected = model.feature_extractor(x)  # (B, T, C)
        got = ChannelsLastFrontend(model.feature_extractor, **tiling)(x)
    assert_close(got, expected, tol=1e-5)


def test_channels_last_frontend_rejects_bad_tiling() -> None:
    from spidr_fast.extraction.frontend import ChannelsLastFrontend

    with pytest.raises(ValueError, match="tile_frames"):
        ChannelsLastFrontend(tiny_model().feature_extractor, tile_frames=0)
    with pytest.raises(ValueError, match="tiled_blocks"):
        ChannelsLastFrontend(tiny_model().feature_extractor, tiled_blocks=8)


def _tf32_settings() -> tuple[bool, bool, str]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()


@pytest.fixture
def tf32_on() -> tuple[bool, bool, str]:
    """TF32 allowed globally (as a user's script may set it); torch's settings put back after the test."""
    saved = _tf32_settings()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    yield _tf32_settings()
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
    torch.set_float32_matmul_precision(saved[2])


def test_fp32_extraction_turns_tf32_off_and_restores_it(tf32_on: tuple[bool, bool, str]) -> None:
    """The forward and the units run with TF32 off (cuBLAS and cuDNN, as the trainer), the global settings
    come back after; nested and concurrent users restore once, when the last leaves."""
    from spidr_fast.extraction.extractor import exact_fp32

    assert tf32_on == (True, True, "high")
    extractor = FeatureExtractor(tiny_model(), layers=[1], units="heads", units_layer=3, device="cpu")
    seen = []
    for name in ("_forward", "_units_of"):
        inner = getattr(extractor, name)
        setattr(extractor, name, lambda *a, inner=inner: seen.append(_tf32_settings()) or inner(*a))
    out = extractor(torch.randn(8_000))
    assert out["units"].shape[0] == out["layer1"].shape[0] > 0
    assert seen == [(False, False, "highest")] * 2
    assert _tf32_settings() == tf32_on
    with exact_fp32():
        with exact_fp32():
            assert _tf32_settings() == (False, False, "highest")
        assert _tf32_settings() == (False, False, "highest")  # an outer user is still inside
    assert _tf32_settings() == tf32_on


def test_exact_fp32_under_the_fp32_precision_api() -> None:
    """torch >= 2.9 after `fp32_precision = "tf32"` refuses legacy-flag reads: exact_fp32 uses the new API
    then (in a subprocess: the mixed-API state would follow the other tests)."""
    import subprocess
    import sys

    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("torch < 2.9 has no fp32_precision API")
    script = (
        "import torch\n"
        "from spidr_fast.extraction.extractor import exact_fp32\n"
        "m, c = torch.backends.cuda.matmul, torch.backends.cudnn.conv\n"
        "m.fp32_precision = c.fp32_precision = 'tf32'\n"
        "with exact_fp32():\n"
        "    assert (m.fp32_precision, c.fp32_precision) == ('ieee', 'ieee')\n"
        "assert (m.fp32_precision, c.fp32_precision) == ('tf32', 'tf32')\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
