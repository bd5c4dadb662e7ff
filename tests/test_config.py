"""Configs: reference field names and defaults, JSON (with/without "model") and TOML."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spidr_fast.config import DinoSRConfig, SpidRConfig, read_model_config
from tests.conftest import FIXTURE_DIR


def test_defaults_are_the_released_models() -> None:
    spidr, dinosr = SpidRConfig(), DinoSRConfig()
    assert spidr.encoder_layer_drop == 0.0 and dinosr.encoder_layer_drop == 0.05
    assert spidr.extractor_conv_layer_config == [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2
    assert (spidr.encoder_embed_dim, spidr.encoder_num_layers, spidr.num_codebooks, spidr.codebook_size) == (
        768,
        12,
        8,
        256,
    )
    assert (spidr.ema_timescale, spidr.ema_threshold) == (20_000, 1e-7)
    assert spidr.model_type == "spidr" and dinosr.model_type == "dinosr"


def test_fixture_config_json() -> None:
    cfg = read_model_config(FIXTURE_DIR / "config.json")
    assert isinstance(cfg, SpidRConfig)
    assert cfg.encoder_embed_dim == 64 and cfg.extractor_conv_layer_config[0] == (32, 10, 5)


def test_json_round_trip_without_model_key(tmp_path: Path) -> None:
    cfg = DinoSRConfig(encoder_qkv_bias=True)
    (tmp_path / "c.json").write_text(json.dumps(cfg.to_dict()))
    assert read_model_config(tmp_path / "c.json") == cfg


def test_toml(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text(
        '[run]\nmodel_type = "spidr"\n[model]\nencoder_num_layers = 6\nnum_codebooks = 4\n'
        "extractor_conv_layer_config = [[64, 10, 5], [64, 3, 2]]\n"
    )
    cfg = read_model_config(tmp_path / "c.toml")
    assert isinstance(cfg, SpidRConfig)
    assert cfg.encoder_num_layers == 6 and cfg.extractor_conv_layer_config == [(64, 10, 5), (64, 3, 2)]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"model": {"no_such_field": 1}}', r"c.json: unknown SpidRConfig|c.json: unknown DinoSRConfig"),
        ('{"encoder_embed_dim": 10, "encoder_num_heads": 3}', "must be divisible"),
        ('{"num_codebooks": 13}', "num_codebooks"),
        ('{"extractor_mode": "batch_norm"}', "extractor_mode"),
    ],
)
def test_bad_configs_are_named(tmp_path: Path, text: str, match: str) -> None:
    (tmp_path / "c.json").write_text(text)
    with pytest.raises(ValueError, match=match):
        read_model_config(tmp_path / "c.json")


def test_unsupported_suffix_and_missing(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("a: 1")
    with pytest.raises(ValueError, match="unsupported config format"):
        read_model_config(tmp_path / "c.yaml")
    with pytest.raises(FileNotFoundError, match="config file not found"):
        read_model_config(tmp_path / "none.json")
