"""Reading a training configuration: the reference's TOML tables into `spidr_fast.config`'s dataclasses.

A config file has the tables `[run]`, `[data]`, `[model]`, `[optimizer]`, `[masking]` and
`[validation.NAME]` (one `DataConfig` per dev set), with the reference's field names and defaults
(`spidr.config`); a reference TOML loads unchanged. Fields declared only for the reference's
configs (`unused` in `spidr_fast.config`) are warned about when set to anything but their default.
Overrides are `section.field=value` with a TOML value (`run.compile=false`, `optimizer.betas=[0.9,
0.98]`, `data.manifest=/data/train.csv`: a bare word is a string), checked against the field's
type. `read_config` is the one entry point; `save_resolved` writes what a run used.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (setup.py installs tomli there)
    import tomli as tomllib

from spidr_fast.config import (
    CONFIG_CLASSES,
    DataConfig,
    DinoSRConfig,
    MaskingConfig,
    ModelType,
    OptimizerConfig,
    RunConfig,
    TrainConfig,
    model_config_from_dict,
)

logger = logging.getLogger(__name__)
PACKAGE_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


SECTIONS: dict[str, type] = {
    "run": RunConfig,
    "data": DataConfig,
    "optimizer": OptimizerConfig,
    "masking": MaskingConfig,
}


def _check(value: Any, tp: Any, where: str) -> Any:
    """`value` converted to type `tp` (tuples from lists, float from int) or a ValueError naming `where`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _check(value, arg, where)
            except ValueError:
                pass
        raise ValueError(f"{where}: {value!r} is not a {tp}")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if tp is type(None):
        if value is not None:
            raise ValueError(f"{where}: expected None")
        return None
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ValueError(f"{where}: {value!r} is not a list")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ValueError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_check(v, a, where) for v, a in zip(value, args))
        inner = args[0] if args else Any
        return origin(_check(v, inner, where) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: {value!r} is not a table")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ValueError(f"{where}: {value!r} is not a {tp.__name__}")
    return value


def _build(cls: type, fields: dict[str, Any], section: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"[{section}]: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    built = cls(**{k: _check(v, hints[k], f"{section}.{k}") for k, v in fields.items()})
    for f in dataclasses.fields(cls):
        if "unused" in f.metadata and f.name in fields and getattr(built, f.name) != getattr(cls(), f.name):
            logger.warning(
                "%s.%s=%r has no effect here (kept so that the reference's configs load): %s",
                section,
                f.name,
                getattr(built, f.name),
                f.metadata["unused"],
            )
    return built


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word: a string


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`section.field=value` (or `validation.NAME.field=value`) applied to the raw TOML tables."""
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2:
            raise ValueError(f"override {item!r} is not section.field=value")
        table = data
        for part in parts[:-1]:
            table = table.setdefault(part, {})
        table[parts[-1]] = _parse_value(value.strip())
    return data


def _model_fields(fields: dict[str, Any], model_type: ModelType, overridden: set[str]) -> dict[str, Any]:
    """The `[model]` table for `model_type`: fields that only the other model type has (e.g. a SpidR
    preset's `ema_timescale` under `run.model_type=dinosr`) are dropped with a warning when they come
    from the file, and refused when given as an override (the user asked for them)."""
    own = {f.name for f in dataclasses.fields(CONFIG_CLASSES[model_type])}
    foreign = {f.name for cls in CONFIG_CLASSES.values() for f in dataclasses.fields(cls)} - own
    if asked := sorted(foreign & overridden & fields.keys()):
        raise ValueError(
            f"model.{', model.'.join(asked)}: not a field of run.model_type={model_type} (only of another model type)"
        )
    if dropped := sorted(foreign & fields.keys()):
        logger.warning(
            "run.model_type=%s: ignoring [model] field(s) %s of the config, which %s does not have",
            model_type,
            ", ".join(dropped),
            CONFIG_CLASSES[model_type].__name__,
        )
    return {k: v for k, v in fields.items() if k not in foreign}


def config_from_dict(data: dict[str, Any], overridden: set[str] | None = None) -> TrainConfig:
    """`overridden`: `[model]` field names given as overrides (see `_model_fields`)."""
    unknown = sorted(set(data) - {*SECTIONS, "model", "validation"})
    if unknown:
        raise ValueError(f"unknown section(s) {', '.join(unknown)}")
    built = {name: _build(cls, data.get(name, {}), name) for name, cls in SECTIONS.items()}
    run: RunConfig = built["run"]
    model_cls = CONFIG_CLASSES[run.model_type]
    fields = _model_fields(data.get("model", {}), run.model_type, overridden or set())
    model = model_config_from_dict(dataclasses.asdict(_build(model_cls, fields, "model")), run.model_type)
    validation = {k: _build(DataConfig, v, f"validation.{k}") for k, v in data.get("validation", {}).items()}
    cfg = TrainConfig(model=model, validation=validation, **built)
    if cfg.data.enable_padding:
        raise ValueError("data.enable_padding=true is not supported: batches are cropped to their shortest utterance")
    if cfg.masking.mask_channel_prob > 0:
        raise ValueError("masking.mask_channel_prob > 0 is not supported")
    for where, data_cfg in [("data", cfg.data), *((f"validation.{k}", v) for k, v in cfg.validation.items())]:
        sizes = (data_cfg.min_sample_size, data_cfg.max_sample_size, data_cfg.max_batch_length)
        if not 0 < sizes[0] <= sizes[1] <= sizes[2]:
            raise ValueError(
                f"need 0 < {where}.min_sample_size <= {where}.max_sample_size <= {where}.max_batch_length, "
                f"got {', '.join(map(str, sizes))}"
            )
    if cfg.run.num_threads < 0:
        raise ValueError(f"run.num_threads must be >= 0 (0: torch's default), got {cfg.run.num_threads}")
    if cfg.optimizer.dtype == "float16":
        raise ValueError(
            "optimizer.dtype='float16' is not supported for training: fp16 needs loss scaling (a GradScaler), "
            "which this trainer does not do; use 'bfloat16' (GPUs from A100 on) or 'float32'"
        )
    return cfg


def resolve_path(path: str | Path) -> Path:
    """A config file, given by its path or as the name of a shipped preset (a file of `PACKAGE_CONFIGS`).

    Raises:
        FileNotFoundError: neither, naming the shipped presets.
    """
    path = Path(path)
    if not path.exists() and (PACKAGE_CONFIGS / f"{path.name.removesuffix('.toml')}.toml").is_file():
        return PACKAGE_CONFIGS / f"{path.name.removesuffix('.toml')}.toml"
    if not path.is_file():
        presets = ", ".join(sorted(p.stem for p in PACKAGE_CONFIGS.glob("*.toml")))
        raise FileNotFoundError(f"config not found: {path} (shipped presets: {presets})")
    return path


def preset_model_fields(preset: str | Path = "tiny", **overrides: Any) -> dict[str, Any]:
    """A preset's `[model]` fields that every model type takes, with `overrides`: the model of tests and
    benchmarks, e.g. `SpidRConfig(**preset_model_fields("tiny", encoder_num_layers=3))`."""
    path = resolve_path(preset)
    fields = tomllib.loads(path.read_text(encoding="utf-8")).get("model", {})
    common = {f.name for f in dataclasses.fields(DinoSRConfig)}
    return {**{k: v for k, v in fields.items() if k in common}, **overrides}


def read_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a TOML (or the JSON that `save_resolved` writes) and apply `key=value` overrides."""
    path = resolve_path(path)
    text = path.read_text(encoding="utf-8")
    data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    try:
        keys = [item.partition("=")[0].strip() for item in overrides or []]
        overridden = {key.removeprefix("model.") for key in keys if key.startswith("model.")}
        return config_from_dict(apply_overrides(data, overrides or []), overridden)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from e


def save_resolved(cfg: TrainConfig, folder: Path) -> Path:
    """Write the resolved config as `train_config.json` (readable back by `read_config`)."""
    from spidr_fast.io import atomic_write_text

    path = folder / "train_config.json"
    text = json.dumps(cfg.to_dict(), indent=2) + "\n"
    return atomic_write_text(path, text)
