"""The encoder: convolutional positional embedding, then post-LN (or pre-LN) transformer layers.

The encoder takes a padded batch as a `Padding` (built once per batch by the caller, outside any
compiled layer: the variable-length backends' flat indices and cumulative lengths cost a host sync),
or a (B, T) bool key mask (True on real frames) that becomes one here, or None when nothing is
padded; attention then runs with no mask at all.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spidr_fast import kernels
from spidr_fast.kernels.attention import Padding
from spidr_fast.models.feature_extractor import ChannelLayerNorm
from spidr_fast.models.layer_norm import LayerNorm


class ConvPositionalEmbedding(nn.Module):
    """`depth` grouped convs, each followed by LayerNorm (no affine) and GELU; padded frames zeroed.

    Each layer is one `kernels.pos_conv_layer` on the (B, T, D) stream (a fused Triton op on CUDA, no
    transposes; the reference on CPU: cuDNN-style conv on a (B, D, T) view + `channel_layer_norm_gelu`).
    """

    def __init__(self, embed_dim: int, kernel_size: int, groups: int, depth: int):
        super().__init__()
        self.layer_kernel_size = max(3, kernel_size // depth)
        self.num_remove = 1 if self.layer_kernel_size % 2 == 0 else 0  # even kernels give one frame too many
        self.layer_norm = ChannelLayerNorm(embed_dim, elementwise_affine=False)
        self.convs = nn.ModuleList(
            nn.Conv1d(embed_dim, embed_dim, self.layer_kernel_size, padding=self.layer_kernel_size // 2, groups=groups)
            for _ in range(depth)
        )

    def forward(self, x: Tensor, padding: Padding | None = None) -> Tensor:
        keep = None if padding is None else padding.mask  # (B, T) bool, True on real frames
        for conv in self.convs:  # (B, T, D) throughout
            x = kernels.pos_conv_layer(x, keep, conv.weight, conv.bias, conv.groups, self.layer_norm.eps)
        return x


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (q, k, v stacked in that order)."""

    def __init__(self, embed_dim: int, num_heads: int, *, qkv_bias: bool, dropout: float):
        super().__init__()
        self.embed_dim, self.num_heads, self.dropout = embed_dim, num_heads, dropout
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=qkv_bias)
        self.proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: Tensor, padding: Padding | None = None) -> Tensor:
        batch, seq, dim = x.shape
        # (B, T, 3D) -> (3, B, H, T, Dh)
        q, k, v = self.qkv(x).view(batch, seq, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        out = kernels.self_attention(q, k, v, padding, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(batch, seq, dim))  # (B, H, T, Dh) -> (B, T, D)


class FeedForward(nn.Module):
    def __init__(self, embed_dim: int, interm_features: int, interm_dropout: float):
        super().__init__()
        self.intermediate_dense = nn.Linear(embed_dim, interm_features)
        self.intermediate_dropout = nn.Dropout(interm_dropout)
        self.output_dense = nn.Linear(interm_features, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.output_dense(self.intermediate_dropout(F.gelu(self.intermediate_dense(x))))


class TransformerLayer(nn.Module):
    """One layer; returns (output, ffn_output) where ffn_output is the FFN result before dropout+residual."""

    def __init__(
        self, embed_dim: int, attention: SelfAttention, feed_forward: FeedForward, dropout: float, *, pre_ln: bool
    ):
        super().__init__()
        self.attention = attention
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = LayerNorm(embed_dim)
        self.feed_forward = feed_forward
        self.final_layer_norm = LayerNorm(embed_dim)
        self.pre_ln = pre_ln

    def forward(self, x: Tensor, padding: Padding | None = None) -> tuple[Tensor, Tensor]:
        if self.pre_ln:
            x = x + self.dropout(self.attention(self.layer_norm(x), padding))
            ffn = self.feed_forward(self.final_layer_norm(x))
            return x + self.dropout(ffn), ffn
        x = self.layer_norm(x + self.dropout(self.attention(x, padding)))
        ffn = self.feed_forward(x)
        return self.final_layer_norm(x + self.dropout(ffn)), ffn


class Transformer(nn.Module):
    """Positional conv + LayerNorm + layers (post-LN), or + layers + final LayerNorm (pre-LN)."""

    def __init__(
        self,
        embed_dim: int,
        num_layers: int,
        num_heads: int,
        ff_interm_features: int,
        *,
        pos_conv_kernel: int,
        pos_conv_groups: int,
        pos_conv_depth: int,
        qkv_bias: bool,
        attention_dropout: float,
        ff_interm_dropout: float,
        dropout: float,
        layer_drop: float,
        pre_ln: bool,
    ):
        super().__init__()
        self.pos_conv_embed = ConvPositionalEmbedding(embed_dim, pos_conv_kernel, pos_conv_groups, pos_conv_depth)
        self.layer_norm = LayerNorm(embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.layer_drop = layer_drop
        # Where layer drop is drawn: None = the global CPU RNG. The trainer sets one seeded by (seed, step)
        # every step, so that every rank drops the same layers (FSDP2's collectives stay matched).
        self.layer_drop_generator: torch.Generator | None = None
        # The layers `iter_layer_outputs` dropped in its last pass (their outputs went unused).
        self.dropped_layers: list[int] = []
        self.pre_ln = pre_ln
        self.layers = nn.ModuleList(
            TransformerLayer(
                embed_dim,
                SelfAttention(embed_dim, num_heads, qkv_bias=qkv_bias, dropout=attention_dropout),
                FeedForward(embed_dim, ff_interm_features, ff_interm_dropout),
                dropout,
                pre_ln=pre_ln,
            )
            for _ in range(num_layers)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference's init: N(0, 0.02) linears with zero bias, then xavier for attention."""
        self.apply(_init_weights)

    @property
    def final_norm(self) -> nn.LayerNorm:
        """The student's last normalisation, never reached by the SpidR loss."""
        return self.layer_norm if self.pre_ln else self.layers[-1].final_layer_norm

    def _embed(self, x: Tensor, padding: Padding | None) -> Tensor:
        return self._embed_norm(x, self.pos_conv_embed(x, padding))

    def _embed_norm(self, x: Tensor, pos: Tensor) -> Tensor:
        """The positional embedding added, then LayerNorm (post-LN) and dropout."""
        x = x + pos
        if not self.pre_ln:
            x = self.layer_norm(x)
        return self.dropout(x)

    def _drop_layer(self) -> bool:
        # Drawn on a CPU generator, and only when layer drop is on: no device sync, no RNG use otherwise.
        return (
            self.training
            and self.layer_drop > 0
            and bool(torch.rand(1, generator=self.layer_drop_generator) <= self.layer_drop)
        )

    def forward(self, x: Tensor, padding: Padding | Tensor | None = None) -> Tensor:
        """(B, T, D) -> (B, T, D), the encoder's final output."""
        padding = as_padding(padding)
        x = self._embed(x, padding)
        for layer in self.layers:
            if not self._drop_layer():
                x, _ = layer(x, padding)
        return self.final_output(x)

    def final_output(self, x: Tensor) -> Tensor:
        """The encoder's output from its last layer's output: pre-LN adds the final LayerNorm."""
        return self.layer_norm(x) if self.pre_ln else x

    def get_intermediate_outputs(
        self,
        x: Tensor,
        padding: Padding | Tensor | None = None,
        num_layers: int | None = None,
        *,
        before_residual: bool = True,
    ) -> list[Tensor]:
        """Per layer: the FFN output before residual (default) or the layer's output.

        A dropped layer (layer drop, training only) still reports its result but leaves x unchanged,
        as in the reference.
        """
        return [ffn if before_residual else out for out, ffn in self.iter_layer_outputs(x, padding, num_layers)]

    def iter_layer_outputs(
        self, x: Tensor, padding: Padding | Tensor | None = None, num_layers: int | None = None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Per layer up to `num_layers`, as computed: (layer output, FFN output before residual).

        A generator: a caller keeps only the layers it needs (get_intermediate_outputs keeps one
        tensor per layer, the extractor only the layers it returns).
        """
        if num_layers is not None and not 0 < num_layers <= len(self.layers):
            raise ValueError(f"num_layers must be in [1, {len(self.layers)}], got {num_layers}")
        padding = as_padding(padding)
        x = self._embed(x, padding)
        self.dropped_layers = []
        for index, layer in enumerate(self.layers[:num_layers]):
            out, ffn = layer(x, padding)
            if self._drop_layer():
                self.dropped_layers.append(index)
            else:
                x = out
            yield out, ffn

    def parameters_after_ffn_of_dropped_layers(self) -> list[nn.Parameter]:
        """The parameters that only a dropped layer's output reaches (post-LN: its final LayerNorm), for the
        layers dropped in the last `iter_layer_outputs` pass.

        A caller that reads the FFN outputs (SpidR's heads) leaves a dropped layer's output unused: eager
        autograd gives these parameters no gradient (None), but a compiled layer returns zeros for them,
        and AdamW moves a parameter with a zero gradient. The trainer sets them back to None.
        """
        if self.pre_ln:  # out = x + dropout(ffn): nothing past the FFN has parameters
            return []
        return [p for i in self.dropped_layers for p in self.layers[i].final_layer_norm.parameters()]


def as_padding(padding: Padding | Tensor | None) -> Padding | None:
    """A `Padding` from a (B, T) key mask (once per batch, before the layers), else unchanged."""
    return Padding.from_mask(padding) if isinstance(padding, Tensor) else padding


def _init_weights(module: nn.Module) -> None:
    # `apply` visits children first, so attention's xavier init overrides the generic linear init.
    if isinstance(module, SelfAttention):
        nn.init.xavier_uniform_(module.qkv.weight, gain=1 / math.sqrt(2))
        nn.init.xavier_uniform_(module.proj.weight)
        nn.init.zeros_(module.proj.bias)
    elif isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
