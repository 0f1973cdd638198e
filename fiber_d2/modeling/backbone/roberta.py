"""FIBER's text tower: transformers' ``RobertaModel`` with FIBER's fused layers on top
(fine-grained spec §1.2, §1.4; coarse spec §1.5).

The top ``num_fusion_layers`` encoder layers are :class:`FusedRobertaLayer`: a ``RobertaLayer``
subclass that reuses every HF submodule and adds ``crossattention_t2i`` (text queries, image keys
and values) and the gate ``alpha_t2i``. HF's own cross-attention (``add_cross_attention``) cannot be
used: it requires ``is_decoder=True``, which makes the self-attention causal.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from detectron2.config import configurable
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import RobertaConfig, RobertaModel
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.roberta.modeling_roberta import RobertaAttention, RobertaLayer

from .causal_text import TextKVCache, causal_text_forward
from .swin import fused_block_dims

__all__ = ["RANDOM_INIT_DEFAULTS", "FusedRobertaLayer", "RobertaTextTower"]

logger = logging.getLogger(__name__)

# settings of the random init (argument: RoBERTa's default), which pretrained weights cannot take
RANDOM_INIT_DEFAULTS = {"position_init_scale": 1.0, "initializer_range": 0.02}


class FusedRobertaLayer(RobertaLayer):
    """A RoBERTa layer with FIBER's text-to-image cross-attention.

    ::

        a   = Dropout(Dense(SelfAttn(text)))                 # no residual yet
        c   = Dropout(Dense'(CrossAttn(query=a, kv=image)))  # 12 heads, no mask over image tokens
        u   = LN_attn(text + a + alpha_t2i * c)
        out = LN_out(u + FFN(u))                             # LN_out optional

    Without image tokens it computes exactly the stock ``RobertaLayer``.
    """

    def __init__(self, config: RobertaConfig, layer_idx: int, image_dim: int):
        """
        Args:
            config: the text tower's config.
            layer_idx: index of this layer in the encoder.
            image_dim: width of the image tokens used as keys/values (512 or 1024 for FIBER-B).
        """
        super().__init__(config, layer_idx=layer_idx)
        cross = RobertaAttention(config, layer_idx=layer_idx, is_cross_attention=True)
        heads_width = cross.self.all_head_size
        cross.self.key = nn.Linear(image_dim, heads_width)
        cross.self.value = nn.Linear(image_dim, heads_width)
        # FIBER applies no LayerNorm to the cross-attention output (no such key in checkpoints).
        cross.output.LayerNorm = nn.Identity()
        self.crossattention_t2i = cross
        self.alpha_t2i = nn.Parameter(torch.zeros(1))  # gate, initialised to exactly 0
        # recompute the cross-attention in the backward pass (RobertaTextTower sets it)
        self.checkpoint_cross_attention = False
        # HF's BERT init for the new projections: N(0, initializer_range), zero bias.
        for module in cross.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=config.initializer_range)
                nn.init.zeros_(module.bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_tokens: torch.Tensor | None = None,
        output_norm: bool = True,
    ) -> torch.Tensor:
        """
        Args:
            hidden_states: (B, T, D) layer input.
            attention_mask: text self-attention mask from ``create_bidirectional_mask`` (bool
                (B, 1, T, T) for sdpa, additive float for eager), or None when nothing is padded.
            image_tokens: (B, N, C_img) un-normalised image tokens, or None (no fusion).
            output_norm: apply the output LayerNorm (False on the last fused coarse layer).

        Returns:
            (B, T, D) layer output.
        """
        attn_out, _ = self.attention.self(hidden_states, attention_mask=attention_mask)
        a = self.attention.output.dropout(self.attention.output.dense(attn_out))
        u = a + hidden_states  # same operand order as HF's RobertaSelfOutput
        if image_tokens is not None:
            if self.checkpoint_cross_attention and torch.is_grad_enabled():
                c = checkpoint(self.cross_attend, a, image_tokens, use_reentrant=False)
            else:
                c = self.cross_attend(a, image_tokens)
            u = u + self.alpha_t2i * c
        u = self.attention.output.LayerNorm(u)
        ffn = self.output.dropout(self.output.dense(self.intermediate(u)))
        return self.output.LayerNorm(ffn + u) if output_norm else ffn + u

    def cross_attend(self, a: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Text-to-image cross-attention (without the gate).

        Args:
            a: (B, T, D) self-attention output (after dense and dropout).
            image_tokens: (B, N, C_img) un-normalised image tokens.

        Returns:
            (B, T, D) cross-attention output after its dense projection and dropout.
        """
        cross = self.crossattention_t2i
        c, _ = cross.self(a, encoder_hidden_states=image_tokens, attention_mask=None)
        return cross.output.dropout(cross.output.dense(c))


class RobertaTextTower(nn.Module):
    """RoBERTa text tower (HF ``RobertaModel`` without pooler) with fused top layers.

    Parameter names: ``model.embeddings.*``, ``model.encoder.layer.{j}.*`` (HF names), plus
    ``crossattention_t2i.*`` and ``alpha_t2i`` in the fused layers.
    """

    @configurable
    def __init__(
        self,
        *,
        hidden_size: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        intermediate_size: int = 3072,
        vocab_size: int = 50265,
        max_position_embeddings: int = 514,
        type_vocab_size: int = 1,
        pad_token_id: int = 1,
        hidden_dropout: float = 0.1,
        attention_dropout: float = 0.1,
        layer_norm_eps: float = 1e-5,
        max_query_len: int = 256,
        attn_implementation: str = "sdpa",
        weights: str = "",
        position_init_scale: float = 1.0,
        initializer_range: float = 0.02,
        image_dims: Sequence[int] = (),
        use_checkpoint: bool = False,
        checkpoint_cross_attention: bool = False,
        freeze: bool = False,
    ):
        """
        Args:
            hidden_size: width D.
            num_layers: encoder layers.
            num_heads: attention heads.
            intermediate_size: FFN width.
            vocab_size: vocabulary size.
            max_position_embeddings: position-table rows (RoBERTa: pads use id ``pad_token_id``,
                real tokens start at ``pad_token_id + 1``).
            type_vocab_size: token types.
            pad_token_id: pad id.
            hidden_dropout: hidden dropout.
            attention_dropout: attention-probability dropout (self- and cross-attention).
            layer_norm_eps: LayerNorm eps.
            max_query_len: longer texts are truncated (with a warning).
            attn_implementation: "sdpa" or "eager".
            weights: HF hub name or local directory of pretrained RoBERTa weights; "" keeps the
                random init. Loaded only when given.
            position_init_scale: random init only (an error with ``weights``): the position table is
                HF's N(0, 0.02) init times this. 0 starts the tower without position information,
                which it then learns only as far as the task needs it; a from-scratch tower trained
                on FIBER's shuffled category prompts, where positions carry no class information,
                learns the categories much faster so (README, "Demo status").
            initializer_range: random init only (an error with ``weights``): std of the normal init
                of every text-tower weight matrix and embedding, the fused cross-attention included
                (HF's ``initializer_range``; RoBERTa's 0.02, chosen for width 768). At a small width
                0.02 leaves each attention sublayer's output a few percent of its input, so a
                from-scratch tower's ``<s>`` state hardly depends on the text and the fused
                cross-attention's queries hardly move (docs/vision_language_demo.md).
            image_dims: width of the image tokens seen by each fused layer, bottom to top; its
                length is the number of fused (top) layers.
            use_checkpoint: activation checkpointing of every layer.
            checkpoint_cross_attention: activation checkpointing of the cross-attention of the
                fused layers only: it keeps the image-token keys/values and the attention
                probabilities (FIBER-B at 800 x 1344: about 0.77 GB) out of memory until the
                backward pass for a small recomputation; same gradients.
            freeze: freeze the whole tower.
        """
        super().__init__()
        if attn_implementation not in ("sdpa", "eager"):
            raise ValueError(
                f"attn_implementation must be 'sdpa' or 'eager', got {attn_implementation!r}"
            )
        if len(image_dims) > num_layers:
            raise ValueError(
                f"{len(image_dims)} fused layers requested but the tower has {num_layers}"
            )
        overrides = {
            "hidden_dropout_prob": hidden_dropout,
            "attention_probs_dropout_prob": attention_dropout,
            "attn_implementation": attn_implementation,
        }
        given = {"position_init_scale": position_init_scale, "initializer_range": initializer_range}
        for name, default in RANDOM_INIT_DEFAULTS.items():
            value = given[name]
            if weights and value != default:
                raise ValueError(
                    f"{name} {value} applies to a random init only; "
                    f"pretrained text weights {weights!r} are loaded as they are"
                )
        if weights:
            model = RobertaModel.from_pretrained(weights, add_pooling_layer=False, **overrides)
            got = (model.config.hidden_size, model.config.num_hidden_layers)
            if got != (hidden_size, num_layers):
                raise ValueError(
                    f"pretrained text weights {weights!r} have (hidden, layers) = {got}, config asks "
                    f"for {(hidden_size, num_layers)}"
                )
            logger.info("Loaded RoBERTa weights from %s", weights)
        else:
            config = RobertaConfig(
                vocab_size=vocab_size,
                hidden_size=hidden_size,
                num_hidden_layers=num_layers,
                num_attention_heads=num_heads,
                intermediate_size=intermediate_size,
                max_position_embeddings=max_position_embeddings,
                type_vocab_size=type_vocab_size,
                pad_token_id=pad_token_id,
                layer_norm_eps=layer_norm_eps,
                initializer_range=initializer_range,
                **overrides,
            )
            model = RobertaModel(config, add_pooling_layer=False)
            with torch.no_grad():
                model.embeddings.position_embeddings.weight.mul_(position_init_scale)
        self.model = model
        config = model.config
        first_fused = config.num_hidden_layers - len(image_dims)
        for offset, image_dim in enumerate(image_dims):
            j = first_fused + offset
            stock = model.encoder.layer[j]
            fused = FusedRobertaLayer(config, layer_idx=j, image_dim=image_dim)
            result = fused.load_state_dict(stock.state_dict(), strict=False)
            if result.unexpected_keys or any(
                not (k.startswith("crossattention_t2i.") or k == "alpha_t2i")
                for k in result.missing_keys
            ):
                raise RuntimeError(f"fused text layer {j} does not match the HF layer: {result}")
            fused.checkpoint_cross_attention = checkpoint_cross_attention
            model.encoder.layer[j] = fused
        self.fused_layer_ids = list(range(first_fused, config.num_hidden_layers))
        self.max_len = min(max_query_len, config.max_position_embeddings - config.pad_token_id - 1)
        self.use_checkpoint = use_checkpoint
        self.hidden_size = config.hidden_size
        if freeze:
            for p in self.parameters():
                p.requires_grad_(False)

    @classmethod
    def from_config(cls, cfg) -> dict:
        lang = cfg.MODEL.LANGUAGE_BACKBONE
        swin = cfg.MODEL.SWIN
        return {
            "hidden_size": lang.HIDDEN_SIZE,
            "num_layers": lang.NUM_LAYERS,
            "num_heads": lang.NUM_HEADS,
            "intermediate_size": lang.INTERMEDIATE_SIZE,
            "vocab_size": lang.VOCAB_SIZE,
            "max_position_embeddings": lang.MAX_POSITION_EMBEDDINGS,
            "type_vocab_size": lang.TYPE_VOCAB_SIZE,
            "pad_token_id": lang.PAD_TOKEN_ID,
            "hidden_dropout": lang.HIDDEN_DROPOUT,
            "attention_dropout": lang.ATTENTION_DROPOUT,
            "layer_norm_eps": lang.LAYER_NORM_EPS,
            "max_query_len": lang.MAX_QUERY_LEN,
            "attn_implementation": lang.ATTN_IMPLEMENTATION,
            "weights": lang.WEIGHTS,
            "position_init_scale": lang.POSITION_INIT_SCALE,
            "initializer_range": lang.INITIALIZER_RANGE,
            # the text layers paired with the top Swin blocks read tokens of those blocks' widths
            "image_dims": fused_block_dims(
                swin.EMBED_DIM, swin.DEPTHS, cfg.MODEL.FIBER.NUM_FUSION_LAYERS
            ),
            "use_checkpoint": lang.USE_CHECKPOINT,
            "checkpoint_cross_attention": lang.CHECKPOINT_CROSS_ATTENTION,
            "freeze": lang.FREEZE,
        }

    @property
    def num_layers(self) -> int:
        """Number of encoder layers."""
        return len(self.model.encoder.layer)

    def embed(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Truncate if needed, embed, and build the self-attention mask.

        Args:
            input_ids: (B, T) token ids (pads = ``pad_token_id``).
            attention_mask: (B, T) 1 for real tokens, 0 for padding.

        Returns:
            hidden (B, T', D) embeddings, the layer mask (HF format for the configured attention
            implementation, or None when nothing is padded), and the (B, T') 0/1 attention mask,
            with T' = min(T, max length).
        """
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} and attention_mask "
                f"{tuple(attention_mask.shape)} must both be (B, T)"
            )
        if input_ids.shape[1] > self.max_len:
            logger.warning(
                "text of %d tokens is longer than the maximum %d; truncating",
                input_ids.shape[1],
                self.max_len,
            )
            input_ids = input_ids[:, : self.max_len]
            attention_mask = attention_mask[:, : self.max_len]
        hidden = self.model.embeddings(input_ids=input_ids)
        layer_mask = create_bidirectional_mask(
            config=self.model.config, inputs_embeds=hidden, attention_mask=attention_mask
        )
        return hidden, layer_mask, attention_mask

    def run_layer(
        self,
        j: int,
        hidden: torch.Tensor,
        layer_mask: torch.Tensor | None,
        image_tokens: torch.Tensor | None = None,
        output_norm: bool = True,
    ) -> torch.Tensor:
        """Run encoder layer ``j``.

        Args:
            j: layer index.
            hidden: (B, T, D) layer input.
            layer_mask: mask returned by :meth:`embed`.
            image_tokens: (B, N, C_img) image tokens for a fused layer, else None.
            output_norm: apply the output LayerNorm (fused layers only may skip it).

        Returns:
            (B, T, D) layer output.
        """
        layer = self.model.encoder.layer[j]
        fused = isinstance(layer, FusedRobertaLayer)
        if not fused and (image_tokens is not None or not output_norm):
            raise ValueError(f"text layer {j} has no cross-attention (it is not a fused layer)")
        args = (hidden, layer_mask, image_tokens, output_norm) if fused else (hidden, layer_mask)
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unimodal forward: every layer, no cross-attention, every output norm.

        Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, T) 1 for real tokens.

        Returns:
            (B, T', D) last hidden states and the (B, T') attention mask (T' = truncated length).
        """
        hidden, layer_mask, attention_mask = self.embed(input_ids, attention_mask)
        for j in range(self.num_layers):
            hidden = self.run_layer(j, hidden, layer_mask)
        return hidden, attention_mask

    def forward_causal(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_tokens: dict[int, torch.Tensor] | None = None,
        cache: TextKVCache | None = None,
    ) -> tuple[torch.Tensor, TextKVCache]:
        """The tower as a causal decoder (captioning), optionally continuing from a key/value
        cache; see :func:`~fiber_d2.modeling.backbone.causal_text.causal_text_forward`.

        Args:
            input_ids: (B, T) new tokens.
            attention_mask: (B, T) 1 for real tokens, or None.
            image_tokens: {fused text layer: (B, N, C) image tokens} (first call only).
            cache: the cache returned by the previous call, or None.

        Returns:
            (B, T, D) hidden states of the new tokens, and the extended cache.
        """
        return causal_text_forward(self, input_ids, attention_mask, image_tokens, cache)
