from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

from spidr_fast.config import SpidRConfig
from spidr_fast.train.config import read_config, save_resolved


def test_base_preset_is_the_reference_recipe() -> None:
    cfg = read_config("base")
    assert cfg.model == SpidRConfig()
    o = cfg.optimizer
    assert (o.lr, o.betas, o.weight_decay, o.eps, o.max_norm) == (5e-4, (0.9, 0.95), 0.01, 1e-6, 10.0)
    assert (o.warmup_steps, o.hold_steps, o.decay_steps, o.max_steps) == (12_000, 188_000, 200_000, 400_000)
    assert (o.scheduler, o.dtype, o.init_lr_scale, o.final_lr_scale) == ("tristage", "bfloat16", 0.01, 0.01)
    assert (cfg.data.max_batch_length, cfg.data.num_buckets, cfg.data.min_sample_size) == (3_800_000, 1000, 2000)
    assert (cfg.masking.mask_prob, cfg.masking.mask_length) == (0.8, 10)


def test_overrides_are_typed_and_checked() -> None:
    cfg = read_config(
        "tiny", ["optimizer.lr=1", "optimizer.betas=[0.8, 0.9]", "data.manifest=/x/y.csv", "run.compile=true"]
    )
    assert cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)
    assert cfg.optimizer.betas == (0.8, 0.9)
    assert cfg.data.manifest == "/x/y.csv" and cfg.run.compile is True
    with pytest.raises(ValueError, match=r"optimizer\.max_steps"):
        read_config("tiny", ["optimizer.max_steps=many"])
    with pytest.raises(ValueError, match="unknown field"):
        read_config("tiny", ["optimizer.learning_rate=1"])
    with pytest.raises(ValueError, match="scheduler"):
        read_config("tiny", ["optimizer.scheduler=linear"])
    with pytest.raises(ValueError, match="encoder_num_layers"):
        read_config("tiny", ["model.encoder_num_layers=2.5"])


def test_reference_style_toml_and_resolved_roundtrip(tmp_path: Path) -> None:
    toml = tmp_path / "ref.toml"
    toml.write_text(
        '[run]\nworkdir = "w"\nwandb_project = "p"\nwandb_name = "n"\nmodel_type = "dinosr"\n'
        '[data]\nmanifest = "m.csv"\n[validation.dev]\nmanifest = "dev.csv"\n'
    )
    cfg = read_config(toml)
    assert cfg.model.model_type == "dinosr" and cfg.validation["dev"].manifest == "dev.csv"
    assert cfg.run.dir == (Path("w").resolve() / "p" / "n")
    again = read_config(save_resolved(cfg, tmp_path))
    assert again == cfg


@pytest.mark.parametrize("preset", ["tiny", "base", "demo"])
@pytest.mark.parametrize("model_type", ["spidr", "dinosr"])
def test_presets_combine_with_either_model_type(
    preset: str, model_type: str, caplog: pytest.LogCaptureFixture
) -> None:
    from spidr_fast.config import CONFIG_CLASSES

    with caplog.at_level(logging.WARNING):
        cfg = read_config(preset, [f"run.model_type={model_type}"])
    assert type(cfg.model) is CONFIG_CLASSES[model_type]
    preset_model = read_config(preset).model  # the preset's own (SpidR) architecture is kept
    for name in ("encoder_embed_dim", "encoder_num_layers", "num_codebooks", "codebook_size", "freeze_step"):
        assert getattr(cfg.model, name) == getattr(preset_model, name)
    if model_type == "dinosr" and preset != "base":  # tiny and demo set SpidR's ema_timescale: said, not hidden
        assert "ignoring [model] field(s) ema_timescale" in caplog.text


def test_model_field_of_the_other_type_given_as_override_is_refused() -> None:
    with pytest.raises(ValueError, match=r"model\.ema_timescale: not a field of run\.model_type=dinosr"):
        read_config("tiny", ["run.model_type=dinosr", "model.ema_timescale=5"])


def test_tiny_trains_as_dinosr(tmp_path: Path) -> None:
    from spidr_fast.data.corpus import generate_corpus
    from spidr_fast.train.trainer import train

    corpus = generate_corpus(tmp_path / "corpus", num_utterances=4, seed=0, max_seconds=3.0)
    overrides = [
        "run.model_type=dinosr",
        f"data.manifest={corpus / 'manifest.csv'}",
        f"run.workdir={tmp_path}",
        "optimizer.max_steps=2",
        "run.log_interval=1",
    ]
    last = train(read_config("tiny", overrides))
    assert math.isfinite(last["loss"]) and "ema_decay" in last
    log = (tmp_path / "spidr" / "tiny" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [1, 2]
    saved = read_config(tmp_path / "spidr" / "tiny" / "train_config.json")
    assert saved.model.model_type == "dinosr" and saved.run.model_type == "dinosr"


def test_float16_training_is_refused_with_the_reason() -> None:
    # fp16 without loss scaling underflows its gradients: refused rather than trained silently wrong.
    with pytest.raises(ValueError, match=r"optimizer\.dtype='float16'.*GradScaler.*bfloat16"):
        read_config("tiny", ["optimizer.dtype=float16"])
    assert read_config("tiny", ["optimizer.dtype=bfloat16"]).optimizer.dtype == "bfloat16"


def test_pin_memory_defaults_to_on_with_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from spidr_fast.train.data import pin_memory

    for cuda in (True, False):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        for preset in ("tiny", "demo"):  # no pin_memory line: the default decides
            cfg = read_config(preset).data
            assert cfg.pin_memory is None and pin_memory(cfg) is cuda
        assert read_config("base").data.pin_memory is True and pin_memory(read_config("base").data) is cuda
        assert pin_memory(read_config("tiny", ["data.pin_memory=false"]).data) is False


def test_batch_sizes_checked_with_the_config() -> None:
    # Before: a ValueError with a traceback from the sampler, once training had started.
    with pytest.raises(ValueError, match=r"data\.max_sample_size <= data\.max_batch_length, got 8000, 48000, 40000"):
        read_config("tiny", ["data.max_batch_length=40000"])
    with pytest.raises(ValueError, match=r"validation\.dev\.min_sample_size"):
        read_config("tiny", ["validation.dev.manifest=x.csv", "validation.dev.min_sample_size=0"])


def test_every_masking_field_is_settable_and_reaches_the_collator() -> None:
    import torch

    from spidr_fast.data.batching import Collator
    from spidr_fast.data.dataset import Utterance

    # k spans of length 1 at distinct starts mask exactly k frames: min_masks=3 sets the count.
    cfg = read_config("tiny", ["masking.min_masks=3", "masking.mask_prob=0.0", "masking.mask_length=1"])
    assert cfg.masking.min_masks == 3
    batch = Collator(cfg.data, cfg.masking)([Utterance(i, 0, torch.randn(8000)) for i in range(2)])
    assert batch.mask_indices.shape == (2, 3)


def test_fields_kept_for_the_reference_warn_when_set(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="spidr_fast.train.config"):
        read_config(
            "tiny", ['optimizer.to_freeze=["feature_extractor", "feature_projection"]', "data.drop_last=false"]
        )
    assert not caplog.records  # the reference's defaults: nothing is ignored
    with caplog.at_level(logging.WARNING, logger="spidr_fast.train.config"):
        read_config("tiny", ["data.drop_last=true", "optimizer.to_freeze=[]", "run.wandb_mode=online"])
    text = caplog.text
    for name in ("data.drop_last=True", "optimizer.to_freeze=[]", "run.wandb_mode='online'"):
        assert f"{name} has no effect here" in text


def test_preset_model_fields_are_the_presets_model() -> None:
    from spidr_fast.config import DinoSRConfig
    from spidr_fast.train.config import preset_model_fields

    assert DinoSRConfig(**preset_model_fields("tiny")) == read_config("tiny", ["run.model_type=dinosr"]).model
    assert SpidRConfig(**preset_model_fields("tiny", codebook_size=16)).codebook_size == 16
    with pytest.raises(FileNotFoundError, match=r"nope\.toml"):
        preset_model_fields("nope.toml")


def test_a_missing_config_names_every_shipped_preset(tmp_path: Path) -> None:
    """The error lists the presets there are (the list was written out by hand and had lost `demo`)."""
    from spidr_fast.train.config import preset_model_fields

    for read in (read_config, preset_model_fields):
        with pytest.raises(FileNotFoundError, match=r"nope\.toml \(shipped presets: base, demo, tiny\)"):
            read(str(tmp_path / "nope.toml"))
