"""DinoSR: a student transformer predicts, at masked frames, the online-codebook labels of an EMA teacher.

Read top to bottom: `forward` is the reference's training objective (`spidr.models.dinosr.DinoSR.forward`);
`get_intermediate_outputs` and `get_codebooks` are the inference API of the reference. The hot paths go
through `spidr_fast.kernels` (codebook assignment + statistics, heads + cross-entropy, attention).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spidr_fast import kernels
from spidr_fast.config import DinoSRConfig
from spidr_fast.kernels.attention import Padding
from spidr_fast.kernels.targets import select_masked
from spidr_fast.models.codebook import Codebooks, perplexity
from spidr_fast.models.feature_extractor import ConvFeatureExtractor, FeatureProjection
from spidr_fast.models.padding import key_mask_from_attention_mask, key_mask_from_lengths
from spidr_fast.models.transformer import Transformer

__all__ = ["DinoSR", "dinosr_ema_decay", "select_masked"]


def dinosr_ema_decay(step: int, start: float, final: float, final_step: int, freeze_step: int) -> float:
    """Linear from `start` to `final` over `final_step` steps, then `final` until `freeze_step`, then 1."""
    if step < final_step:
        return final - (final - start) * (1 - step / final_step)
    return final if step < freeze_step else 1.0


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2), else the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


class DinoSR(nn.Module):
    config_class = DinoSRConfig

    def __init__(self, cfg: DinoSRConfig | None = None):
        super().__init__()
        cfg = cfg if cfg is not None else self.config_class()
        if not isinstance(cfg, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(cfg).__name__}")
        self.cfg = cfg
        self.feature_extractor = ConvFeatureExtractor(
            cfg.extractor_conv_layer_config, cfg.extractor_mode, bias=cfg.extractor_conv_bias
        )
        self.feature_projection = FeatureProjection(self.feature_extractor.out_channels, cfg.encoder_embed_dim)
        self.projection_dropout = nn.Dropout(cfg.encoder_projection_dropout)
        self.student = Transformer(
            cfg.encoder_embed_dim,
            cfg.encoder_num_layers,
            cfg.encoder_num_heads,
            cfg.encoder_ff_interm_features,
            pos_conv_kernel=cfg.encoder_pos_conv_kernel,
            pos_conv_groups=cfg.encoder_pos_conv_groups,
            pos_conv_depth=cfg.encoder_pos_conv_depth,
            qkv_bias=cfg.encoder_qkv_bias,
            attention_dropout=cfg.encoder_attention_dropout,
            ff_interm_dropout=cfg.encoder_ff_interm_dropout,
            dropout=cfg.encoder_dropout,
            layer_drop=cfg.encoder_layer_drop,
            pre_ln=cfg.encoder_layer_norm_first,
        )
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(cfg.encoder_embed_dim, cfg.codebook_size), nn.LogSoftmax(dim=-1))
            for _ in range(cfg.num_codebooks)
        )
        self.codebooks = Codebooks(cfg.num_codebooks, cfg.encoder_embed_dim, cfg.codebook_size, cfg.codebook_decay)
        # The teacher: an fp32 copy of the student with fresh weights (as the reference), moved only by EMA.
        self.teacher = copy.deepcopy(self.student).float()
        self.teacher.reset_parameters()
        self.teacher.requires_grad_(False)
        self.mask_embedding = nn.Parameter(torch.empty(cfg.encoder_embed_dim).uniform_())
        self.register_buffer("current_step", torch.zeros(1, dtype=torch.int64))
        self.teacher.eval()

    # ---------------------------------------------------------------- schedule and EMA
    @property
    def num_codebooks(self) -> int:
        return len(self.codebooks)

    def ema_decay(self, step: int) -> float:
        c = self.cfg
        return dinosr_ema_decay(step, c.ema_start_decay, c.ema_final_decay, c.ema_final_step, c.freeze_step)

    def train(self, mode: bool = True) -> DinoSR:
        super().train(mode)
        self.teacher.eval()  # the teacher never drops anything
        return self

    def freeze_extractor(self) -> None:
        self.feature_extractor.requires_grad_(False)
        self.feature_projection.requires_grad_(False)

    @torch.no_grad()
    def update_ema(self, step: int) -> float:
        """Move the teacher towards the student after optimizer step `step`; returns the decay used.

        Two multi-tensor calls: `_foreach_lerp_` (bitwise equal to a per-parameter `lerp_`) for the
        averaged parameters, `_foreach_copy_` for the excluded ones (the positional conv) and buffers.
        """
        self.current_step.fill_(step)
        decay = self.ema_decay(step)
        if step >= self.cfg.freeze_step:
            self.freeze_extractor()
        if 0.0 < decay < 1.0:
            lerp_t, lerp_s, copy_t, copy_s = [], [], [], []
            student_params = dict(self.student.named_parameters())
            for name, t in self.teacher.named_parameters():
                excluded = any(name.startswith(prefix) for prefix in self.cfg.ema_exclude_layers)
                (copy_t if excluded else lerp_t).append(t)
                (copy_s if excluded else lerp_s).append(student_params[name])
            for t, s in zip(self.teacher.buffers(), self.student.buffers()):
                copy_t.append(t)
                copy_s.append(s)
            # FSDP2 shards student and teacher alike: the EMA runs on the local shards (DTensor has no
            # sharding rule for _foreach_copy_, and skipping its dispatch saves host time).
            lerp_t, lerp_s, copy_t, copy_s = ([_local(t) for t in ts] for ts in (lerp_t, lerp_s, copy_t, copy_s))
            if lerp_t:
                torch._foreach_lerp_(lerp_t, [s.to(t.dtype) for t, s in zip(lerp_t, lerp_s)], 1 - decay)
            if copy_t:
                torch._foreach_copy_(copy_t, copy_s)
        return decay

    # ---------------------------------------------------------------- inputs
    def features(
        self,
        waveforms: Tensor,
        *,
        attention_mask: Tensor | None = None,
        lengths: Tensor | None = None,
        conv: Callable[[Tensor], Tensor] | None = None,
    ) -> tuple[Tensor, Padding | None]:
        """The input step of every forward, public for callers that run the student's layers themselves.

        Waveforms (as `get_intermediate_outputs` takes them) -> projected features (B, T, D) and the
        padding that `student.iter_layer_outputs` takes (None: nothing padded). `conv` replaces the
        conv stack by an equal (B, S) -> (B, T, C) computation (the extractor's channels-last CPU
        front-end; layer_norm mode only, where the padding does not change the conv features).
        """
        return self._features(waveforms, attention_mask, lengths, conv)

    def _features(
        self,
        waveforms: Tensor,
        attention_mask: Tensor | None,
        lengths: Tensor | None,
        conv: Callable[[Tensor], Tensor] | None = None,
    ) -> tuple[Tensor, Padding | None]:
        """Waveforms -> projected features (B, T, D) and the batch's `Padding` (None: nothing padded).

        Built once here, before the layers (a compiled layer gets the packed-attention metadata as
        input). No host sync under torch.compile: the eager-only checks and shortcuts below are the
        data-dependent ones (value checks of `lengths`, "nothing is padded" -> no mask at all).
        """
        if attention_mask is not None and lengths is not None:
            raise ValueError("pass either attention_mask or lengths, not both")
        num_samples = waveforms.shape[-1]
        num_frames = self.feature_extractor.num_frames(num_samples)
        eager = not torch.compiler.is_compiling()
        sample_lengths = key_mask = None
        if lengths is not None:
            sample_lengths = torch.as_tensor(lengths, device=waveforms.device).long()
            if sample_lengths.shape != waveforms.shape[:1]:
                raise ValueError(f"lengths must have shape ({waveforms.shape[0]},), got {tuple(sample_lengths.shape)}")
            if eager and (bool((sample_lengths > num_samples).any()) or bool((sample_lengths <= 0).any())):
                raise ValueError(f"lengths must be in [1, {num_samples}], got {sample_lengths.tolist()}")
            if eager and bool((sample_lengths == num_samples).all()):
                sample_lengths = None  # nothing is padded
            else:
                key_mask = key_mask_from_lengths(self.feature_extractor.output_lengths(sample_lengths), num_frames)
        elif attention_mask is not None:
            key_mask = key_mask_from_attention_mask(attention_mask, num_frames)
            if eager and bool(key_mask.all()):
                key_mask = None  # e.g. the reference collator's all-True masks: exactly the unmasked model
            elif self.cfg.extractor_mode == "group_norm":
                # A frame mask cannot tell the real sample count: a row whose frames cover the whole
                # waveform uses all its samples (as the reference), a shorter one the fewest samples
                # that give its frames.
                frames = key_mask.sum(-1)
                fewest = self.feature_extractor.min_input_length(frames)
                sample_lengths = torch.where(frames == num_frames, num_samples, fewest)
        conv_features = self.feature_extractor(waveforms, sample_lengths) if conv is None else conv(waveforms)
        return self.feature_projection(conv_features), None if key_mask is None else Padding.from_mask(key_mask)

    # ---------------------------------------------------------------- inference API
    def get_intermediate_outputs(
        self,
        waveforms: Tensor,
        *,
        attention_mask: Tensor | None = None,
        lengths: Tensor | None = None,
        before_residual: bool = True,
        num_layers: int | None = None,
    ) -> list[Tensor]:
        """One (B, T, D) tensor per student layer: the FFN output before residual, or the layer output.

        Args:
            waveforms: (B, samples) float, 16 kHz, each standardised (the model never standardises).
            attention_mask: the reference's (B, 1, T, T) bool mask, True where a key is a real frame.
            lengths: (B,) real samples per waveform; the cheaper alternative to `attention_mask`.
            num_layers: stop after this many layers (saves the work of the rest).
        """
        features, padding = self._features(waveforms, attention_mask, lengths)
        return self.student.get_intermediate_outputs(features, padding, num_layers, before_residual=before_residual)

    def _head_inputs_for_inference(self, features: Tensor, padding: Padding | None) -> list[Tensor]:
        """DinoSR: every head reads the student's final output."""
        return [self.student(features, padding)] * self.num_codebooks

    def get_codebooks(
        self,
        waveforms: Tensor,
        *,
        attention_mask: Tensor | None = None,
        lengths: Tensor | None = None,
        onehot: bool = False,
    ) -> list[Tensor | None]:
        """None for the first (layers - num_codebooks) layers, then each head's probabilities (squeezed)
        or their one-hot argmax."""
        features, padding = self._features(waveforms, attention_mask, lengths)
        out: list[Tensor | None] = [None] * (len(self.student.layers) - self.num_codebooks)
        for head, x in zip(self.heads, self._head_inputs_for_inference(features, padding)):
            probs = head(x).float().exp().squeeze()
            out.append(F.one_hot(probs.argmax(-1), probs.shape[-1]) if onehot else probs)
        return out

    # ---------------------------------------------------------------- training objective
    # The glue between the layers is in methods of its own (`_student_input`, `_targets`, `_heads_loss`), so
    # that the trainer can compile each as a region (spidr_fast/train/parallelize.py: `GLUE_REGIONS`); what
    # stays in `forward` is host-side work (the padding metadata, layer drop) and the cross-rank reduction.
    def _student_input(self, features: Tensor, mask_indices: Tensor | None) -> Tensor:
        """Projection dropout, then the mask embedding at the (B, M) masked frames (None: none masked)."""
        x = self.projection_dropout(features)
        if mask_indices is None:
            return x
        masked = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device).scatter_(1, mask_indices, True)
        return torch.where(masked.unsqueeze(-1), self.mask_embedding.to(x.dtype), x)

    def _student_outputs(self, x: Tensor, padding: Padding | None) -> list[Tensor]:
        """DinoSR: every head reads the student's final output (one (B, T, D) tensor for all heads)."""
        return [self.student(x, padding)]

    def parameters_unreached_by_the_loss(self) -> list[nn.Parameter]:
        """Trainable parameters the last training forward's loss did not reach although a compiled layer
        gives them a (zero) gradient. DinoSR's student skips a dropped layer entirely: none."""
        return []

    def _targets(
        self, teacher_layers: list[Tensor], padding: Padding | None, mask_indices: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The teacher's top layers -> instance-normalised targets at the masked frames (C, N, D) fp32 ->
        their codebook labels (C, N), this rank's per-codeword counts (C, K) and sums (C, K, D)."""
        key_mask = None if padding is None else padding.mask
        return self.codebooks.assign(kernels.instance_norm_targets(teacher_layers, key_mask, mask_indices))

    def _heads_loss(self, outputs: list[Tensor], mask_indices: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Head i reads `outputs[i]` (or the one output for all) at the masked frames: losses (C, N), and
        the heads' probability sums (C, K)."""
        if len(outputs) == 1:  # one (N, D) gather, viewed by every head
            head_inputs = select_masked(outputs[0], mask_indices).unsqueeze(0).expand(self.num_codebooks, -1, -1)
        else:
            head_inputs = torch.stack([select_masked(y, mask_indices) for y in outputs])  # (C, N, D)
        weight = torch.stack([head[0].weight for head in self.heads])  # (C, K, D)
        bias = torch.stack([head[0].bias for head in self.heads])  # (C, K)
        return kernels.heads_cross_entropy(head_inputs, weight, bias, labels)

    def forward(
        self,
        waveforms: Tensor,
        *,
        mask_indices: Tensor | None = None,
        attention_mask: Tensor | None = None,
        lengths: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """One training forward: the loss per masked frame (B * M,) and {"target_ppl", "pred_ppl"}.

        In training mode the codebooks take their EMA step. `mask_indices` (B, M) int64, sorted per
        row; None predicts every frame.
        """
        features, padding = self._features(waveforms, attention_mask, lengths)
        x = self._student_input(features, mask_indices)
        if mask_indices is None:
            batch, frames, _ = features.shape
            mask_indices = torch.arange(frames, device=x.device).expand(batch, -1)
        outputs = self._student_outputs(x, padding)

        with torch.no_grad():
            teacher_layers = self.teacher.get_intermediate_outputs(features, padding)[-self.num_codebooks :]
            labels, counts, sums = self._targets(teacher_layers, padding, mask_indices)  # (C, N), (C, K), (C, K, D)
        losses, prob_sums = self._heads_loss(outputs, mask_indices, labels)  # (C, N), (C, K)

        num_frames = torch.full((), labels.shape[1], dtype=torch.float32, device=labels.device)
        counts, sums, prob_sums, num_frames = self.codebooks.all_reduce(counts, sums, prob_sums, num_frames)
        if self.training:
            self.codebooks.update(counts, sums)
        metrics = {
            "target_ppl": perplexity(counts, num_frames).mean(),
            "pred_ppl": perplexity(prob_sums, num_frames).mean(),
        }
        return losses.mean(0), metrics
