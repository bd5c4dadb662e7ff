"""Model configurations: frozen dataclasses with the reference's field names and defaults.

`DinoSRConfig` and `SpidRConfig` accept exactly the keys of the reference's `config.json` (the file
beside a released `.pt`, optionally under a "model" key) and of the `[model]` table of its TOML
training configs. Comments name the matching fairseq field.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

SAMPLE_RATE = 16_000
DEFAULT_CONV_LAYER_CONFIG: list[tuple[int, int, int]] = [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2
ModelType = Literal["spidr", "dinosr"]


@dataclass(frozen=True)
class DinoSRConfig:
    """DinoSR (reproduced) configuration; the defaults are the released `dinosr_base_reproduced`."""

    extractor_mode: Literal["group_norm", "layer_norm"] = "layer_norm"  # model.extractor_mode
    extractor_conv_bias: bool = False  # model.conv_bias
    extractor_conv_layer_config: list[tuple[int, int, int]] = field(  # model.conv_feature_layers
        default_factory=lambda: list(DEFAULT_CONV_LAYER_CONFIG)
    )
    encoder_embed_dim: int = 768  # model.encoder_embed_dim
    encoder_projection_dropout: float = 0.0  # model.dropout_input
    encoder_pos_conv_kernel: int = 95  # model.conv_pos
    encoder_pos_conv_groups: int = 16  # model.conv_pos_groups
    encoder_pos_conv_depth: int = 5  # model.pos_conv_depth
    encoder_num_layers: int = 12  # model.encoder_layers
    encoder_num_heads: int = 12  # model.encoder_attention_heads
    encoder_attention_dropout: float = 0.1  # model.attention_dropout
    encoder_ff_interm_features: int = 3072  # model.encoder_ffn_embed_dim
    encoder_ff_interm_dropout: float = 0.0  # model.activation_dropout
    encoder_dropout: float = 0.1  # model.dropout
    encoder_layer_norm_first: bool = False  # model.layer_norm_first
    encoder_layer_drop: float = 0.05  # model.encoder_layerdrop
    encoder_qkv_bias: bool = False  # not in fairseq, where q/k/v always have a bias

    codebook_size: int = 256  # model.codebook_size
    codebook_decay: float = 0.9  # model.codebook_decay
    num_codebooks: int = 8  # model.average_top_k_layers
    ema_start_decay: float = 0.999  # model.ema_decay
    ema_final_decay: float = 0.9999  # model.ema_end_decay
    ema_final_step: int = 30_000  # model.ema_anneal_end_step
    ema_exclude_layers: list[str] = field(default_factory=lambda: ["pos_conv_embed"])
    freeze_step: int = 200_000  # model.freeze_teacher_step

    def __post_init__(self) -> None:
        # JSON/TOML give lists; keep tuples so that configs compare and hash the same however they were read.
        object.__setattr__(self, "extractor_conv_layer_config", [tuple(c) for c in self.extractor_conv_layer_config])
        if self.extractor_mode not in ("group_norm", "layer_norm"):
            raise ValueError(f"extractor_mode must be 'group_norm' or 'layer_norm', got {self.extractor_mode!r}")
        if self.encoder_embed_dim % self.encoder_num_heads:
            raise ValueError(
                f"encoder_embed_dim ({self.encoder_embed_dim}) must be divisible by "
                f"encoder_num_heads ({self.encoder_num_heads})"
            )
        if not 0 < self.num_codebooks <= self.encoder_num_layers:
            raise ValueError(
                f"num_codebooks ({self.num_codebooks}) must be in [1, encoder_num_layers={self.encoder_num_layers}]"
            )

    @property
    def model_type(self) -> ModelType:
        return "dinosr"

    def to_dict(self) -> dict[str, Any]:
        """The reference's `config.json` content (lists, not tuples)."""
        d = dataclasses.asdict(self)
        d["extractor_conv_layer_config"] = [list(c) for c in self.extractor_conv_layer_config]
        return d


@dataclass(frozen=True)
class SpidRConfig(DinoSRConfig):
    """SpidR configuration; the defaults are the released `spidr_base`."""

    ema_timescale: float = 20_000
    ema_threshold: float = 1e-7
    encoder_layer_drop: float = 0.0  # model.encoder_layerdrop

    @property
    def model_type(self) -> ModelType:
        return "spidr"


CONFIG_CLASSES: dict[str, type[DinoSRConfig]] = {"spidr": SpidRConfig, "dinosr": DinoSRConfig}


def infer_model_type(fields: dict[str, Any]) -> ModelType:
    """SpidR's config is DinoSR's plus the exponential EMA schedule fields."""
    return "spidr" if {"ema_timescale", "ema_threshold"} & fields.keys() else "dinosr"


def model_config_from_dict(fields: dict[str, Any], model_type: ModelType | None = None) -> DinoSRConfig:
    """Build a config from a dict in the reference's form (optionally nested under "model")."""
    if "model" in fields and isinstance(fields["model"], dict):
        fields = fields["model"]
    model_type = model_type or infer_model_type(fields)
    if model_type not in CONFIG_CLASSES:
        raise ValueError(f"model_type must be one of {sorted(CONFIG_CLASSES)}, got {model_type!r}")
    cls = CONFIG_CLASSES[model_type]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
    return cls(**fields)


def read_model_config(path: str | Path, model_type: ModelType | None = None) -> DinoSRConfig:
    """Read a model config from the reference's `config.json` or a TOML file (its `[model]` table).

    The model type is taken from `model_type`, else from a TOML `[run] model_type`, else inferred
    from the fields (SpidR has `ema_timescale`/`ema_threshold`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".toml":
        data = tomllib.loads(text)
        model_type = model_type or data.get("run", {}).get("model_type")
        fields = data.get("model", {})
    elif path.suffix == ".json":
        fields = json.loads(text)
    else:
        raise ValueError(f"unsupported config format {path.suffix!r} for {path}: use .json or .toml")
    try:
        return model_config_from_dict(fields, model_type)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from e


# Compute dtypes by the names configs and command lines use (autocast; float32 disables it);
# `DTYPES` maps them to torch dtypes.
DTYPE_NAMES = ("float32", "bfloat16", "float16")

if TYPE_CHECKING:
    import torch

    DTYPES: dict[str, torch.dtype]


def __getattr__(name: str) -> Any:
    """`DTYPES`: {name: torch dtype} for `DTYPE_NAMES`. Built on first use (PEP 562), so that this
    module, and the CLI's help, load no torch."""
    if name == "DTYPES":
        import torch

        globals()[name] = {dtype: getattr(torch, dtype) for dtype in DTYPE_NAMES}
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
