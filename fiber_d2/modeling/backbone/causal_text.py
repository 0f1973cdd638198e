"""The text tower used as a causal decoder (coarse spec §1.8): causal self-attention, one-way
cross-attention to fixed image tokens, and a key/value cache for step-by-step decoding.

FIBER captions with its bidirectional RoBERTa tower by switching the self-attention mask to causal +
padding; fused layers cross-attend (text to image only) to image tokens that do not change while a
caption is generated. With a causal mask the states of a prefix never change when tokens are
appended, so a decoder can keep each layer's self-attention keys/values of the prefix and the
cross-attention keys/values of the image (:class:`TextKVCache`) and run only the new token per step.
The original re-encodes the whole prefix every step; both give the same states up to float rounding.

Everything here reads the tower's existing modules (HF ``RobertaLayer`` / :class:`FusedRobertaLayer`
weights); the tower's default bidirectional path (``RobertaTextTower.forward``, ``run_layer``) is not
touched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TextKVCache", "causal_text_forward", "image_kv"]


@dataclass
class TextKVCache:
    """Keys/values of the decoded prefix and of the image, per text layer.

    Attributes:
        self_kv: per layer, (keys, values) of the prefix, each (B, H, T_past, d); None before the
            first step.
        cross_kv: per layer, (keys, values) of the image tokens, each (B, H, N, d), computed once;
            None for layers without cross-attention.
        key_bias: (B, T_past) additive bias of the cached keys (0 real, dtype minimum padding).
        positions: (B,) number of non-padding tokens seen so far (RoBERTa positions continue there).
    """

    self_kv: list[tuple[torch.Tensor, torch.Tensor] | None]
    cross_kv: list[tuple[torch.Tensor, torch.Tensor] | None]
    key_bias: torch.Tensor | None = None
    positions: torch.Tensor | None = None

    @property
    def length(self) -> int:
        """Number of cached prefix tokens."""
        return 0 if self.key_bias is None else self.key_bias.shape[1]

    def select(self, index: torch.Tensor) -> TextKVCache:
        """Rows ``index`` of the batch (beam reordering / expansion); a new cache.

        Args:
            index: (B',) long row indices.
        """

        def pick(kv):
            return (
                None if kv is None else (kv[0].index_select(0, index), kv[1].index_select(0, index))
            )

        return TextKVCache(
            self_kv=[pick(kv) for kv in self.self_kv],
            cross_kv=[pick(kv) for kv in self.cross_kv],
            key_bias=None if self.key_bias is None else self.key_bias.index_select(0, index),
            positions=None if self.positions is None else self.positions.index_select(0, index),
        )


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, T, H*d) -> (B, H, T, d)."""
    b, t, _ = x.shape
    return x.view(b, t, num_heads, -1).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, d) -> (B, T, H*d)."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def _attend(q, k, v, bias, dropout: float) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)


def image_kv(layer: nn.Module, image_tokens: torch.Tensor, num_heads: int):
    """Cross-attention keys/values of a fused layer for (B, N, C) image tokens."""
    cross = layer.crossattention_t2i.self
    return _heads(cross.key(image_tokens), num_heads), _heads(cross.value(image_tokens), num_heads)


def _layer_step(
    layer: nn.Module,
    hidden: torch.Tensor,
    bias: torch.Tensor,
    past: tuple[torch.Tensor, torch.Tensor] | None,
    cross_kv: tuple[torch.Tensor, torch.Tensor] | None,
    num_heads: int,
    dropout: float,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """One post-LN layer on the new tokens (the computation of ``FusedRobertaLayer.forward`` with
    a causal mask and cached keys/values; a stock ``RobertaLayer`` when ``cross_kv`` is None)."""
    sa = layer.attention.self
    q = _heads(sa.query(hidden), num_heads)
    k = _heads(sa.key(hidden), num_heads)
    v = _heads(sa.value(hidden), num_heads)
    if past is not None:
        k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
    a = layer.attention.output.dropout(
        layer.attention.output.dense(_merge(_attend(q, k, v, bias, dropout)))
    )
    u = a + hidden
    if cross_kv is not None:
        cross = layer.crossattention_t2i
        cq = _heads(cross.self.query(a), num_heads)
        c = _merge(_attend(cq, cross_kv[0], cross_kv[1], None, dropout))
        u = u + layer.alpha_t2i * cross.output.dropout(cross.output.dense(c))
    u = layer.attention.output.LayerNorm(u)
    ffn = layer.output.dropout(layer.output.dense(layer.intermediate(u)))
    return layer.output.LayerNorm(ffn + u), (k, v)


def causal_text_forward(
    tower: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    image_tokens: dict[int, torch.Tensor] | None = None,
    cache: TextKVCache | None = None,
) -> tuple[torch.Tensor, TextKVCache]:
    """Causal forward of a :class:`~fiber_d2.modeling.backbone.roberta.RobertaTextTower`.

    Every layer keeps its output LayerNorm. Layers listed in ``image_tokens`` (fused layers only)
    cross-attend, without a mask, to their image tokens (the caption forward's one-way flow).

    Args:
        tower: the text tower.
        input_ids: (B, T) the new tokens (the whole caption without a cache).
        attention_mask: (B, T) 1 for real tokens; None = all real.
        image_tokens: {text layer: (B, N, C_layer) image tokens}; read only when the cache has no
            image keys/values yet.
        cache: keys/values of the previous tokens (from an earlier call), or None.

    Returns:
        (B, T, D) hidden states of the new tokens and the cache extended by them.
    """
    model = tower.model
    config = model.config
    layers = model.encoder.layer
    num_heads = config.num_attention_heads
    pad = config.pad_token_id
    b, t = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    real = attention_mask.to(torch.bool)
    if cache is None:
        cache = TextKVCache(self_kv=[None] * len(layers), cross_kv=[None] * len(layers))
        image_tokens = image_tokens or {}
        for j, tokens in image_tokens.items():
            if not hasattr(layers[j], "crossattention_t2i"):
                raise ValueError(f"text layer {j} has no cross-attention (it is not a fused layer)")
            cache.cross_kv[j] = image_kv(layers[j], tokens, num_heads)
    past_len = cache.length
    if past_len + t > tower.max_len:
        raise ValueError(
            f"{past_len + t} text positions exceed the text tower's maximum {tower.max_len}"
        )
    # RoBERTa positions: real tokens count up from pad + 1, padding sits at pad (as HF computes them)
    seen = cache.positions if cache.positions is not None else input_ids.new_zeros(b)
    count = seen[:, None] + real.long().cumsum(dim=1)
    position_ids = torch.where(real, count + pad, torch.full_like(count, pad))
    hidden = model.embeddings(input_ids=input_ids, position_ids=position_ids)

    dtype = hidden.dtype
    minimum = torch.finfo(dtype).min
    new_bias = torch.zeros(b, t, dtype=dtype, device=hidden.device).masked_fill(~real, minimum)
    key_bias = new_bias if cache.key_bias is None else torch.cat([cache.key_bias, new_bias], 1)
    causal = torch.ones(t, past_len + t, dtype=torch.bool, device=hidden.device).tril(past_len)
    bias = key_bias[:, None, None, :].expand(b, 1, t, past_len + t)
    bias = bias.masked_fill(~causal, minimum)

    dropout = config.attention_probs_dropout_prob if tower.training else 0.0
    new_kv = []
    for j, layer in enumerate(layers):
        hidden, kv = _layer_step(
            layer, hidden, bias, cache.self_kv[j], cache.cross_kv[j], num_heads, dropout
        )
        new_kv.append(kv)
    return hidden, TextKVCache(
        self_kv=new_kv,
        cross_kv=cache.cross_kv,
        key_bias=key_bias,
        positions=count[:, -1] if t else seen,
    )
