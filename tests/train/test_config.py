from __future__ import annotations

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
