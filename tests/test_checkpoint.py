"""Checkpoint I/O: round trips, the reference's layouts, fairseq DinoSR conversion, and every error path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import spidr_fast
from spidr_fast import checkpoint
from spidr_fast.checkpoint import CheckpointError
from spidr_fast.config import DinoSRConfig, SpidRConfig

TINY = dict(
    extractor_conv_layer_config=[(8, 10, 5)] + [(8, 3, 2)] * 4 + [(8, 2, 2)] * 2,
    encoder_embed_dim=16,
    encoder_num_heads=2,
    encoder_num_layers=2,
    encoder_ff_interm_features=32,
    encoder_pos_conv_kernel=15,
    encoder_pos_conv_groups=4,
    codebook_size=4,
    num_codebooks=2,
)


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("cls", [spidr_fast.SpidR, spidr_fast.DinoSR])
def test_save_load_round_trip(cls: type, tmp_path: Path) -> None:
    model = cls(cls.config_class(**TINY))
    model.update_ema(7)
    path = spidr_fast.save_model(model, tmp_path / "m.pt")
    assert json.loads((tmp_path / "config.json").read_text())["model"]["encoder_embed_dim"] == 16
    loaded = spidr_fast.load_model(path)
    assert type(loaded) is cls and loaded.cfg == model.cfg and not loaded.training
    assert_same_state(model, loaded)
    assert loaded.current_step.item() == 7
    assert list(torch.load(path, weights_only=True)) == ["model"]  # the released format
    assert not list(tmp_path.glob(".*.tmp"))  # no temp file left behind


def test_load_bare_state_dict_with_module_prefix_and_flat_config(tmp_path: Path) -> None:
    model = spidr_fast.SpidR(SpidRConfig(**TINY))
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, tmp_path / "ddp.pt")
    (tmp_path / "config.json").write_text(json.dumps(model.cfg.to_dict()))  # no "model" key
    assert_same_state(model, spidr_fast.load_model(tmp_path / "ddp.pt"))


def test_training_checkpoint_layout(tmp_path: Path) -> None:
    model = spidr_fast.DinoSR(DinoSRConfig(**TINY))
    torch.save({"model": model.state_dict(), "optimizer": {}, "step": 3, "epoch": 0}, tmp_path / "ckpt.pt")
    (tmp_path / "config.json").write_text(json.dumps({"model": model.cfg.to_dict()}))
    loaded = spidr_fast.load_model(tmp_path / "ckpt.pt", model_type="dinosr")
    assert isinstance(loaded, spidr_fast.DinoSR)
    assert_same_state(model, loaded)


def test_no_config_beside_says_so_and_how_to_give_it(tmp_path: Path) -> None:
    model = spidr_fast.SpidR(SpidRConfig(**TINY))
    spidr_fast.save_model(model, tmp_path / "m.pt", write_config=False)
    with pytest.raises(CheckpointError) as info:
        spidr_fast.load_model(tmp_path / "m.pt")  # not base-sized: no list of hundreds of keys
    message = str(info.value)
    assert "no config.json beside" in message and "--config" in message and "config=" in message
    assert len(message.splitlines()) == 1 and "feature_extractor" not in message
    config = tmp_path / "elsewhere.json"
    config.write_text(json.dumps(model.cfg.to_dict()))
    assert_same_state(model, spidr_fast.load_model(tmp_path / "m.pt", config=spidr_fast.read_model_config(config)))


def test_no_config_beside_base_weights_load_with_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A released base `.pt` alone (its weights fit the defaults) still loads; the base size is TINY here."""
    model = spidr_fast.SpidR(SpidRConfig(**TINY))
    spidr_fast.save_model(model, tmp_path / "m.pt", write_config=False)
    monkeypatch.setattr(checkpoint, "SpidRConfig", lambda: SpidRConfig(**TINY))
    with pytest.warns(UserWarning, match="no config.json"):
        assert_same_state(model, spidr_fast.load_model(tmp_path / "m.pt"))


def test_missing_file() -> None:
    with pytest.raises(FileNotFoundError, match=r"checkpoint not found: .*nowhere\.pt"):
        spidr_fast.load_model("/nonexistent/nowhere.pt")


def test_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "junk.pt").write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.pt is not a PyTorch checkpoint"):
        spidr_fast.load_model(tmp_path / "junk.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        spidr_fast.load_model(tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="is not a file"):
        spidr_fast.load_model(tmp_path)


def test_wrong_keys_and_shapes_are_named(tmp_path: Path) -> None:
    model = spidr_fast.SpidR(SpidRConfig(**TINY))
    state = model.state_dict()
    del state["mask_embedding"]
    state["extra.weight"] = torch.zeros(1)
    state["heads.0.0.bias"] = torch.zeros(5)
    torch.save({"model": state}, tmp_path / "bad.pt")
    (tmp_path / "config.json").write_text(json.dumps({"model": model.cfg.to_dict()}))
    with pytest.raises(CheckpointError) as info:
        spidr_fast.load_model(tmp_path / "bad.pt")
    message = str(info.value)
    assert "bad.pt" in message
    assert "missing keys (1): mask_embedding" in message
    assert "unexpected keys (1): extra.weight" in message
    assert "heads.0.0.bias: checkpoint (5,) vs model (4,)" in message


def test_bad_config_json_is_named(tmp_path: Path) -> None:
    spidr_fast.save_model(spidr_fast.SpidR(SpidRConfig(**TINY)), tmp_path / "m.pt")
    (tmp_path / "config.json").write_text(json.dumps({"model": {"encoder_embed_dimm": 3}}))
    with pytest.raises(CheckpointError, match=r"config.json: unknown DinoSRConfig field\(s\): encoder_embed_dimm"):
        spidr_fast.load_model(tmp_path / "m.pt")


def to_fairseq_layout(model: spidr_fast.DinoSR) -> dict:
    """Write a DinoSR state dict as the original fairseq checkpoint lays it out (independent of the converter)."""
    sd = model.state_dict()
    out: dict = {"mask_emb": sd["mask_embedding"], "_ema": {}}
    for i in range(len(model.feature_extractor.conv_layers)):
        out[f"feature_extractor.conv_layers.{i}.0.weight"] = sd[f"feature_extractor.conv_layers.{i}.conv.weight"]
        for leaf in ("weight", "bias"):
            out[f"feature_extractor.conv_layers.{i}.2.1.{leaf}"] = sd[
                f"feature_extractor.conv_layers.{i}.layer_norm.{leaf}"
            ]
    for leaf in ("weight", "bias"):
        out[f"layer_norm.{leaf}"] = sd[f"feature_projection.layer_norm.{leaf}"]
        out[f"post_extract_proj.{leaf}"] = sd[f"feature_projection.projection.{leaf}"]
    for i in range(model.num_codebooks):
        out[f"_codebook{i}"] = sd[f"codebooks.{i}.codebook"]
        out[f"_codebook_cnts{i}"] = sd[f"codebooks.{i}.counts"]
        out[f"heads.{i}.weight"] = sd[f"heads.{i}.0.weight"]
        out[f"heads.{i}.bias"] = sd[f"heads.{i}.0.bias"]
    names = {
        "fc1": "feed_forward.intermediate_dense",
        "fc2": "feed_forward.output_dense",
        "final_layer_norm": "final_layer_norm",
        "self_attn.out_proj": "attention.proj",
        "self_attn_layer_norm": "layer_norm",
    }
    for ours, target, prefix in (("student", out, "encoder."), ("teacher", out["_ema"], "")):
        for leaf in ("weight", "bias"):
            target[f"{prefix}layer_norm.{leaf}"] = sd[f"{ours}.layer_norm.{leaf}"]
            for j in range(5):
                target[f"{prefix}pos_conv.{j}.0.{leaf}"] = sd[f"{ours}.pos_conv_embed.convs.{j}.{leaf}"]
            for i in range(len(model.student.layers)):
                for fairseq_name, our_name in names.items():
                    target[f"{prefix}layers.{i}.{fairseq_name}.{leaf}"] = sd[f"{ours}.layers.{i}.{our_name}.{leaf}"]
                q, k, v = sd[f"{ours}.layers.{i}.attention.qkv.{leaf}"].chunk(3)
                for name, part in zip("qkv", (q, k, v), strict=True):
                    target[f"{prefix}layers.{i}.self_attn.{name}_proj.{leaf}"] = part
    return {"model": out, "last_optimizer_state": {"state": {0: {"step": 1234}}}}


def test_fairseq_dinosr_conversion(tmp_path: Path) -> None:
    model = spidr_fast.DinoSR(DinoSRConfig(**TINY, encoder_qkv_bias=True))
    model.current_step.fill_(1234)
    fairseq = to_fairseq_layout(model)
    converted = checkpoint.state_dict_from_fairseq_dinosr(fairseq)
    assert converted.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(converted[k], v), k
    # load_model recognises the layout too
    torch.save(fairseq, tmp_path / "dinosr.pt")
    (tmp_path / "config.json").write_text(json.dumps(model.cfg.to_dict()))
    assert_same_state(model, spidr_fast.load_model(tmp_path / "dinosr.pt"))
    with pytest.raises(CheckpointError, match="unknown fairseq DinoSR key: bogus"):
        checkpoint.state_dict_from_fairseq_dinosr({"model": {"bogus": torch.zeros(1), "_ema": {}}})


def test_released_weights_fail_fast_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    # Port 9 (discard) on loopback: refused at once, like a machine with no network.
    monkeypatch.setitem(checkpoint.RELEASED_URLS, "spidr_base", "http://127.0.0.1:9/spidr_base.pt")
    with pytest.raises(RuntimeError) as info:
        spidr_fast.spidr_base(timeout=2)
    message = str(info.value)
    assert "http://127.0.0.1:9/spidr_base.pt" in message and "load_model" in message
    assert not (tmp_path / "checkpoints" / "spidr_base.pt").exists()


def test_released_weights_read_from_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file already in the hub cache is used without any download."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setitem(checkpoint.RELEASED_URLS, "spidr_base", "http://127.0.0.1:9/tiny.pt")
    model = spidr_fast.SpidR(SpidRConfig(**TINY))
    (tmp_path / "checkpoints").mkdir()
    torch.save({"model": model.state_dict()}, tmp_path / "checkpoints" / "tiny.pt")
    monkeypatch.setattr(checkpoint, "SpidRConfig", lambda: SpidRConfig(**TINY))
    assert_same_state(model, spidr_fast.spidr_base())
