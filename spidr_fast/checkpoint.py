"""Checkpoints in the reference's format: `{"model": state_dict}` with `config.json` beside the `.pt`.

`load_model` reads released or training checkpoints of the reference (and of spidr_fast, which
writes the same format), `save_model` writes one the reference loads, and the `*_base*` functions
fetch the released weights through the torch hub cache.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from spidr_fast.config import DinoSRConfig, ModelType, SpidRConfig, infer_model_type, model_config_from_dict
from spidr_fast.io import atomic_write, atomic_write_text
from spidr_fast.models import DinoSR, SpidR

MODEL_CLASSES: dict[str, type[DinoSR]] = {"spidr": SpidR, "dinosr": DinoSR}
RELEASED_URLS = {
    "spidr_base": "https://dl.fbaipublicfiles.com/shared/devai/assets/models/spidr_base.pt",
    "dinosr_base_reproduced": "https://dl.fbaipublicfiles.com/shared/devai/assets/models/dinosr_base_reproduced.pt",
    "dinosr_base_original": "https://data.csail.mit.edu/placesaudio/dinosr/dinosr.ckpt",
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says why."""


class DownloadError(RuntimeError):
    """Released weights that could not be downloaded (no network): the message says how to load them instead."""


def build_model(cfg: DinoSRConfig) -> DinoSR:
    return MODEL_CLASSES[cfg.model_type](cfg)


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises pickle/zip errors of many kinds for a file that is not a checkpoint
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({type(e).__name__}: {e})") from e
    return state_dict_from_checkpoint(obj, str(path))


def state_dict_from_checkpoint(obj: Any, source: str = "checkpoint") -> dict[str, Tensor]:
    """The model's state dict from a loaded checkpoint: `{"model": sd}`, a bare sd, or fairseq DinoSR."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source} holds a {type(obj).__name__}, not a state dict")
    if "_ema" in obj.get("model", obj):  # the original fairseq DinoSR layout
        return state_dict_from_fairseq_dinosr(obj)
    if "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{source} is not a model state dict (values that are not tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _config_beside(path: Path, model_type: ModelType | None) -> DinoSRConfig | None:
    """The config in `config.json` beside `path`, or None when there is none."""
    config_path = path.parent / "config.json"
    if not config_path.is_file():
        return None
    try:
        fields = json.loads(config_path.read_text(encoding="utf-8"))
        return model_config_from_dict(fields, model_type)
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{config_path}: {e}") from e


def _mismatches(model: DinoSR, state_dict: Mapping[str, Tensor]) -> tuple[list[str], list[str], list[str]]:
    """(missing keys, unexpected keys, 'key: shapes' mismatches) of `state_dict` against `model`."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and state_dict[k].shape != own[k].shape
    ]
    return missing, unexpected, mismatched


def load_state_dict_strict(model: DinoSR, state_dict: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """`load_state_dict(strict=True)` with an error that lists every missing/unexpected key and bad shape."""
    missing, unexpected, mismatched = _mismatches(model, state_dict)
    if missing or unexpected or mismatched:
        lines = [f"{source} does not fit {type(model).__name__}({model.cfg.model_type} config):"]
        for title, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        ):
            if items:
                lines.append(
                    f"  {title} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else "")
                )
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state_dict)


def load_model(path: str | Path, model_type: ModelType | None = None, *, config: DinoSRConfig | None = None) -> DinoSR:
    """Load a reference or spidr_fast checkpoint (`.pt`, `{"model": state_dict}` or a bare state dict).

    The config comes from `config` (e.g. `read_model_config("config.json")`), else `config.json`
    beside the file (optionally under "model"). Without either, the base config is used if the
    weights fit it exactly (a released base `.pt` on its own, with a warning); otherwise a
    `CheckpointError` says that the config is missing and how to give it. SpidR vs DinoSR is
    `model_type`, else inferred from the config. A `module.` prefix (DDP) is stripped. The model
    is returned in eval mode, on the CPU.
    """
    path = Path(path)
    state_dict = _read_state_dict(path)
    if config is None:
        config = _config_beside(path, model_type)
        if config is None:
            return _load_with_base_config(path, state_dict, model_type)
    elif model_type is not None and config.model_type != model_type:
        raise ValueError(f"model_type={model_type!r} but config is a {type(config).__name__}")
    model = build_model(config)
    load_state_dict_strict(model, state_dict, str(path))
    return model.eval()


def _load_with_base_config(path: Path, state_dict: Mapping[str, Tensor], model_type: ModelType | None) -> DinoSR:
    """A checkpoint without its config: the base config if the weights fit it, else a clear error."""
    kind = model_type or "spidr"
    model = build_model(SpidRConfig() if kind == "spidr" else DinoSRConfig())
    missing, unexpected, mismatched = _mismatches(model, state_dict)
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"no config.json beside {path}, and its weights are not the {kind} base size ({len(missing)} missing, "
            f"{len(unexpected)} unexpected and {len(mismatched)} mis-shaped keys). Put the model's config.json "
            f"beside it, or give the config: spidr-fast extract --config CONFIG (.json or .toml), "
            "spidr_fast.load_model(path, config=spidr_fast.read_model_config(CONFIG))."
        )
    warnings.warn(f"no config.json beside {path}: its weights fit the {kind} base config, using it", stacklevel=3)
    model.load_state_dict(state_dict)
    return model.eval()


def save_model(model: DinoSR, path: str | Path, *, write_config: bool = True) -> Path:
    """Write `{"model": state_dict}` (the reference's released format) and `config.json` beside it."""
    path = Path(path)
    state_dict = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: torch.save({"model": state_dict}, tmp))
    if write_config:
        text = json.dumps({"model": model.cfg.to_dict()}, indent=2)
        atomic_write_text(path.parent / "config.json", text)
    return path


# ---------------------------------------------------------------- released weights
def _download(url: str, dest: Path, timeout: float) -> None:
    """Stream `url` into `dest` (temp file + rename), with a progress bar; fail fast without network."""
    from tqdm import tqdm

    try:
        response = urllib.request.urlopen(url, timeout=timeout)
    except (urllib.error.URLError, OSError) as e:
        raise DownloadError(
            f"could not download {url} ({e}). Without network, fetch the file elsewhere and copy it to {dest} "
            "(the torch hub cache, looked at first), or load it by path: "
            f"spidr_fast.load_model('/path/to/{dest.name}'), spidr-fast extract --checkpoint /path/to/{dest.name}."
        ) from e
    total = int(response.headers.get("Content-Length") or 0) or None

    def write(tmp: str) -> None:
        with response, open(tmp, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))

    atomic_write(dest, write)


def _fetch(name: str, *, timeout: float = 10.0) -> Any:
    """Released checkpoint `name`, from the torch hub cache (downloaded there on first use)."""
    url = RELEASED_URLS[name]
    dest = Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlparse(url).path).name
    if not dest.is_file():
        _download(url, dest, timeout)
    # The fairseq checkpoint pickles its training config (argparse/omegaconf objects): not weights-only.
    return torch.load(dest, map_location="cpu", weights_only=not dest.name.endswith(".ckpt"))


def _released(name: str, cfg: DinoSRConfig, timeout: float) -> DinoSR:
    model = build_model(cfg)
    load_state_dict_strict(model, state_dict_from_checkpoint(_fetch(name, timeout=timeout), name), name)
    return model.eval()


def spidr_base(*, timeout: float = 10.0) -> SpidR:
    """The released SpidR base (eval mode), fetched once into the torch hub cache."""
    return _released("spidr_base", SpidRConfig(), timeout)


def dinosr_base_reproduced(*, timeout: float = 10.0) -> DinoSR:
    """DinoSR base as reproduced by the SpidR authors (eval mode)."""
    return _released("dinosr_base_reproduced", DinoSRConfig(), timeout)


def dinosr_base_original(*, timeout: float = 10.0) -> DinoSR:
    """The original fairseq DinoSR base (q/k/v biases), converted on load (eval mode)."""
    return _released("dinosr_base_original", DinoSRConfig(encoder_qkv_bias=True), timeout)


# ---------------------------------------------------------------- fairseq DinoSR conversion
_FAIRSEQ_LAYER_NAMES = {
    "fc1": "feed_forward.intermediate_dense",
    "fc2": "feed_forward.output_dense",
    "final_layer_norm": "final_layer_norm",
    "self_attn.out_proj": "attention.proj",
    "self_attn_layer_norm": "layer_norm",
}


def _fairseq_encoder_key(key: str, prefix: str) -> str | None:
    """`layers.3.fc1.weight` -> `{prefix}.layers.3.feed_forward.intermediate_dense.weight` (None: q/k/v)."""
    parts = key.split(".")
    if parts[0] == "pos_conv":  # pos_conv.{j}.0.{weight,bias}
        return f"{prefix}.pos_conv_embed.convs.{parts[1]}.{parts[-1]}"
    if parts[0] == "layer_norm":
        return f"{prefix}.{key}"
    if parts[0] == "layers":
        inner, leaf = ".".join(parts[2:-1]), parts[-1]
        if inner in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            return None
        if inner in _FAIRSEQ_LAYER_NAMES:
            return f"{prefix}.layers.{parts[1]}.{_FAIRSEQ_LAYER_NAMES[inner]}.{leaf}"
    raise CheckpointError(f"unknown fairseq DinoSR encoder key: {key}")


def _fuse_qkv(source: Mapping[str, Tensor], prefix: str, out: dict[str, Tensor]) -> None:
    """Concatenate fairseq's separate q/k/v projections into qkv (q, k, v order)."""
    layers = sorted({int(k.split(".")[1]) for k in source if k.startswith("layers.")})
    for i in layers:
        for leaf in ("weight", "bias"):
            parts = [source.get(f"layers.{i}.self_attn.{p}_proj.{leaf}") for p in "qkv"]
            if all(p is not None for p in parts):
                out[f"{prefix}.layers.{i}.attention.qkv.{leaf}"] = torch.cat(parts, dim=0)


def state_dict_from_fairseq_dinosr(checkpoint: Mapping[str, Any]) -> dict[str, Tensor]:
    """Map an original fairseq DinoSR checkpoint (`{"model": {..., "_ema": {...}}}`) to our keys."""
    model = checkpoint.get("model", checkpoint)
    if "_ema" not in model:
        raise CheckpointError("not a fairseq DinoSR checkpoint: no '_ema' (teacher) entry")
    out: dict[str, Tensor] = {}
    student = {}
    for key, value in model.items():
        if key == "_ema":
            continue
        if key == "mask_emb":
            out["mask_embedding"] = value
        elif key.startswith("post_extract_proj."):
            out["feature_projection.projection." + key.split(".", 1)[1]] = value
        elif key.startswith("layer_norm."):
            out["feature_projection." + key] = value
        elif key.startswith("feature_extractor.conv_layers."):
            _, _, i, *rest = key.split(".")
            # fairseq blocks: Sequential(conv, dropout, norm, GELU); a layer norm is (transpose, LN, transpose).
            sub = ".".join(rest)
            if sub in ("0.weight", "0.bias"):
                out[f"feature_extractor.conv_layers.{i}.conv.{rest[-1]}"] = value
            elif sub in ("2.1.weight", "2.1.bias", "2.weight", "2.bias"):
                out[f"feature_extractor.conv_layers.{i}.layer_norm.{rest[-1]}"] = value
            else:
                raise CheckpointError(f"unknown fairseq DinoSR key: {key}")
        elif key.startswith("encoder."):
            student[key.removeprefix("encoder.")] = value
        elif key.startswith("_codebook_cnts"):
            out[f"codebooks.{key.removeprefix('_codebook_cnts')}.counts"] = value
        elif key.startswith("_codebook"):
            out[f"codebooks.{key.removeprefix('_codebook')}.codebook"] = value
        elif key.startswith("heads."):
            _, i, leaf = key.split(".")
            out[f"heads.{i}.0.{leaf}"] = value
        else:
            raise CheckpointError(f"unknown fairseq DinoSR key: {key}")
    for prefix, source in (("student", student), ("teacher", model["_ema"])):
        for key, value in source.items():
            name = _fairseq_encoder_key(key, prefix)
            if name is not None:
                out[name] = value
        _fuse_qkv(source, prefix, out)
    step = checkpoint.get("last_optimizer_state", {}).get("state", {}).get(0, {}).get("step", 0)
    out["current_step"] = torch.tensor([int(step)])
    return out


__all__ = [
    "CheckpointError",
    "build_model",
    "dinosr_base_original",
    "dinosr_base_reproduced",
    "infer_model_type",
    "load_model",
    "save_model",
    "spidr_base",
    "state_dict_from_fairseq_dinosr",
]
