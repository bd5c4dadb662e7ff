"""Every configuration of the package: frozen dataclasses with the reference's field names and defaults.

`DinoSRConfig` and `SpidRConfig` (the model) accept exactly the keys of the reference's `config.json`
(the file beside a released `.pt`, optionally under a "model" key) and of the `[model]` table of its
TOML training configs; comments name the matching fairseq field. `RunConfig`, `DataConfig`,
`OptimizerConfig` and `MaskingConfig` are the other tables of a training config (`TrainConfig`,
read by `spidr_fast.train.config.read_config`); the data pipeline takes `DataConfig` and
`MaskingConfig` as they are.
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


# Training configuration: the sections of the reference's TOML training configs (`[run]`, `[data]`,
# `[optimizer]`, `[masking]`; `[model]` is one of the classes above), with its field names and
# defaults. `spidr_fast.train.config.read_config` reads them from a file. Fields the reference lacks
# are marked "spidr_fast" in their comment; fields declared only so that the reference's configs load
# carry `unused(reason)` and are warned about when set to anything but their default.
MaskSelection = Literal["static", "uniform", "normal", "poisson"]


def unused(reason: str) -> dict[str, str]:
    """Metadata of a field kept only for the reference's configs: why it has no effect here."""
    return {"unused": reason}


@dataclass(frozen=True)
class RunConfig:
    """Where the run lives, how often it logs and saves, and how the model is parallelised and compiled."""

    workdir: str = "runs"
    wandb_project: str = "spidr"  # reference: run folder is workdir/wandb_project/wandb_name
    wandb_name: str = "default"
    wandb_mode: Literal["online", "offline", "disabled"] = field(
        default="offline", metadata=unused("no Weights & Biases logging (TensorBoard and train_log.jsonl instead)")
    )
    random_seed: int = 0
    use_deterministic: bool = False
    log_interval: int = 200
    save_interval: int = 2_500
    init_ckpt: str | None = None
    compile: bool = True
    keep_latest: int = -1
    model_type: ModelType = "dinosr"
    slurm_validation: dict[str, Any] | None = field(
        default=None, metadata=unused("no submitit jobs: validation runs in the training job (validation_interval)")
    )
    # spidr_fast
    parallelism: Literal["fsdp", "ddp", "none"] = "fsdp"  # "none" only with one process
    compile_backend: str = "inductor"
    compile_dynamic: bool = True  # symbolic (B, T): one compile per layer whatever the batch shape
    compile_glue: bool = True  # compile the glue between the layers too (parallelize.GLUE_REGIONS)
    device: Literal["auto", "cuda", "cpu"] = "auto"
    checkpoint_format: Literal["full", "sharded"] = "full"  # one .pt (rank 0) or a DCP folder per step
    validation_interval: int = 0  # steps between validations (0: at each save)
    flops_per_device: float = 0.0  # peak FLOP/s for MFU; 0 = guessed from the GPU name (none on CPU)
    max_time_s: float = 0.0  # stop (and save) after this much wall time; 0 = no limit
    tensorboard: bool = True  # when installed
    num_threads: int = 0  # torch CPU threads (torch.set_num_threads); 0 = torch's default

    @property
    def dir(self) -> Path:
        return Path(self.workdir).resolve() / self.wandb_project / self.wandb_name


@dataclass(frozen=True)
class DataConfig:
    """Data loading and batching (`spidr_fast.data.batching` takes it as is); defaults are the reference's."""

    manifest: str = ""
    enable_padding: bool = False  # the reference's padded mode is not supported: must stay False
    rand_crop: bool = True
    normalize: bool = True
    num_buckets: int = 1000
    min_sample_size: int = 2_000
    max_sample_size: int = 320_000
    max_batch_length: int = 3_800_000  # samples per batch per GPU (~237 s at 16 kHz)
    drop_last: bool = field(
        default=False,
        metadata=unused("nothing is dropped: the largest batches are split until every rank has as many"),
    )
    num_workers: int = 10
    pin_memory: bool | None = None  # spidr_fast: None = on when CUDA is available (reference: false)
    prefetch_factor: int = 2
    persistent_workers: bool = True
    random_seed: int = 0
    bucket_method: Literal["uniform", "percentile"] = "uniform"
    alignments_path: str | None = None
    skip_bad: bool = False  # spidr_fast: log and skip unreadable files instead of stopping


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW, clipping, precision and LR schedule; defaults are the reference recipe (`spidr.config`)."""

    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.01
    eps: float = 1e-6
    max_norm: float = 10.0
    dtype: Literal["float32", "float16", "bfloat16"] = "bfloat16"
    init_lr_scale: float = 0.01
    final_lr_scale: float = 0.01
    max_steps: int = 400_000
    warmup_steps: int = 12_000
    hold_steps: int = 188_000
    decay_steps: int = 200_000
    rsqrt_timescale: int = 10_000
    rsqrt_shift: int = 0
    scheduler: Literal["tristage", "cosine", "rsqrt", "constant"] = "tristage"
    exclude_from_optimizer: list[str] = field(default_factory=lambda: ["teacher"])
    to_freeze: list[str] = field(
        default_factory=lambda: ["feature_extractor", "feature_projection"],
        metadata=unused(
            "the feature extractor and projection (the reference's default) stop training at model.freeze_step, "
            "whatever this lists"
        ),
    )

    @property
    def mixed_precision(self) -> bool:
        return self.dtype != "float32"


@dataclass(frozen=True)
class MaskingConfig:
    """Span masking over frames (`spidr_fast.data.masks` takes it as is); defaults are the reference's.

    Channel masking is not supported: `mask_channel_prob` must stay 0, and the other `mask_channel_*`
    fields, which only matter when it is not, are kept for the reference's configs.
    """

    mask_prob: float = 0.8
    mask_selection: MaskSelection = "static"
    mask_other: float = 0.0
    mask_length: int = 10
    no_mask_overlap: bool = False
    mask_min_space: int = 1
    min_masks: int = 2  # spidr_fast: the reference's MaskGenerator passes min_masks=2 for time masks
    mask_channel_prob: float = 0.0
    mask_channel_selection: MaskSelection = "static"
    mask_channel_other: float = 0.0
    mask_channel_length: int = 10
    no_mask_channel_overlap: bool = False
    mask_channel_min_space: int = 1


@dataclass(frozen=True)
class TrainConfig:
    """A whole training config: one instance per section, one `DataConfig` per validation set."""

    run: RunConfig
    data: DataConfig
    model: DinoSRConfig
    optimizer: OptimizerConfig
    masking: MaskingConfig
    validation: dict[str, DataConfig]

    def to_dict(self) -> dict[str, Any]:
        d = {name: dataclasses.asdict(getattr(self, name)) for name in ("run", "data", "optimizer", "masking")}
        d["model"] = self.model.to_dict()
        d["validation"] = {k: dataclasses.asdict(v) for k, v in self.validation.items()}
        return d


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
