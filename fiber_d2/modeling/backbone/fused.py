"""Fusion in the backbone: the lock-step schedule that runs the Swin and RoBERTa towers together
(fine-grained spec §1.2, coarse spec §1.3 and §1.6-1.7).

The schedule is data: the last ``n`` image blocks are paired, in order, with the last ``n`` text
layers (FIBER-B: stage-3 blocks 14-17 with text layers 6-9, stage-4 blocks 0-1 with layers 10-11).
Everything below the first pair is a unimodal *prefix* (it depends on one modality only, so it can
be reused across prompts or images); the pairs run in one loop where each side reads the other's
state from before the step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import Backbone

from .roberta import RobertaTextTower
from .swin import SwinImageTower

__all__ = ["FusionStep", "FusionPrefix", "FusedSwinRoberta", "fusion_schedule"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FusionStep:
    """One lock-step exchange: global image block ``image_block`` (stage ``stage``, block
    ``block`` within it) with text layer ``text_layer``."""

    image_block: int
    stage: int
    block: int
    text_layer: int


@dataclass
class FusionPrefix:
    """State after the unimodal prefix of a fused forward.

    Attributes:
        image: (B, H, W, C) input of the first fused block, before that block's patch merging.
        image_outputs: stage outputs already complete, {"res2": (B, C, H, W), ...}.
        text: (B, T, D) input of the first fused text layer.
        text_layer_mask: self-attention mask of the text layers (HF format) or None.
        attention_mask: (B, T) 0/1 text attention mask (after truncation).
    """

    image: torch.Tensor
    text: torch.Tensor
    text_layer_mask: torch.Tensor | None
    attention_mask: torch.Tensor
    image_outputs: dict[str, torch.Tensor] = field(default_factory=dict)

    def select(self, image_rows: torch.Tensor, text_rows: torch.Tensor) -> FusionPrefix:
        """The prefix of the pairs (image ``image_rows[k]``, text ``text_rows[k]``).

        Args:
            image_rows, text_rows: (P,) int64 rows of this prefix's images and texts.

        Returns:
            a :class:`FusionPrefix` of batch P (gradients flow back to this one).
        """
        layer_mask = self.text_layer_mask
        if layer_mask is not None and layer_mask.shape[0] > 1:
            layer_mask = layer_mask[text_rows]
        return FusionPrefix(
            image=self.image[image_rows],
            text=self.text[text_rows],
            text_layer_mask=layer_mask,
            attention_mask=self.attention_mask[text_rows],
            image_outputs={k: v[image_rows] for k, v in self.image_outputs.items()},
        )


def fusion_schedule(image_tower: SwinImageTower, text_tower: RobertaTextTower) -> list[FusionStep]:
    """Pair the fused image blocks with the fused text layers, bottom to top.

    Args:
        image_tower: the image tower (its ``fused_block_ids``).
        text_tower: the text tower (its ``fused_layer_ids``).

    Returns:
        one :class:`FusionStep` per pair, in forward order.
    """
    blocks, layers = image_tower.fused_block_ids, text_tower.fused_layer_ids
    if len(blocks) != len(layers):
        raise ValueError(
            f"{len(blocks)} fused image blocks cannot pair with {len(layers)} fused text layers"
        )
    steps = []
    for g, j in zip(blocks, layers):
        s, b = image_tower.block_position(g)
        steps.append(FusionStep(image_block=g, stage=s, block=b, text_layer=j))
    return steps


class FusedSwinRoberta(Backbone):
    """Swin image tower + RoBERTa text tower with FIBER's fusion in the top layers.

    ``forward`` returns ``(image_features, text)`` where ``image_features`` maps ``res2..res5``
    to NCHW maps (after the per-output norms) and ``text`` holds ``hidden`` (B, T, D) and ``mask``
    (B, T). Its ``output_shape`` describes the image features, so detectron2's FPN can sit on it.
    """

    @configurable
    def __init__(
        self,
        *,
        image_tower: SwinImageTower,
        text_tower: RobertaTextTower,
        fused_last_text_norm: bool = True,
        fused_last_image_norm: bool = True,
        fusion_enabled: bool = True,
    ):
        """
        Args:
            image_tower: the Swin tower (its top blocks carry cross-attention).
            text_tower: the RoBERTa tower (its top layers carry cross-attention).
            fused_last_text_norm: apply the last text layer's output LayerNorm on the fused path
                (the coarse stage skips it).
            fused_last_image_norm: apply the last image output's norm on the fused path (the
                coarse stage skips ``vit_model.norm``).
            fusion_enabled: default of ``forward(..., fuse=None)``.
        """
        super().__init__()
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.fused_last_text_norm = fused_last_text_norm
        self.fused_last_image_norm = fused_last_image_norm
        self.fusion_enabled = fusion_enabled
        self.schedule = fusion_schedule(image_tower, text_tower)
        self._out_shapes = image_tower.output_shape()
        self._out_features = list(self._out_shapes)
        logger.info(
            "Fusion schedule (image block (stage, block) <-> text layer): %s",
            ", ".join(f"({st.stage}, {st.block})<->{st.text_layer}" for st in self.schedule),
        )

    @classmethod
    def from_config(cls, cfg) -> dict:
        return {
            "image_tower": SwinImageTower(cfg),
            "text_tower": RobertaTextTower(cfg),
            "fused_last_text_norm": cfg.MODEL.FIBER.FUSED_LAST_TEXT_NORM,
            "fused_last_image_norm": cfg.MODEL.FIBER.FUSED_LAST_IMAGE_NORM,
            "fusion_enabled": cfg.MODEL.FIBER.FUSION_ENABLED,
        }

    def output_shape(self) -> dict[str, ShapeSpec]:
        """Channels and strides of the image features."""
        return dict(self._out_shapes)

    @property
    def size_divisibility(self) -> int:
        """Input sides must be multiples of this (32 for 4 Swin stages)."""
        return self.image_tower.size_divisibility

    @property
    def _first_fused_block(self) -> int:
        """Global index of the first fused image block (all blocks without fusion)."""
        return self.schedule[0].image_block if self.schedule else self.image_tower.num_blocks

    @property
    def _first_fused_layer(self) -> int:
        """Index of the first fused text layer (all layers without fusion)."""
        return self.schedule[0].text_layer if self.schedule else self.text_tower.num_layers

    # ------------------------------------------------------------------ unimodal paths
    def forward_image(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Image tower alone (no fusion, every output norm).

        Args:
            images: (B, 3, H, W).

        Returns:
            {"res2".."res5"}: (B, C_s, H_s, W_s).
        """
        return self.image_tower(images)

    def forward_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Text tower alone (no fusion, every output norm).

        Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, T) 1 for real tokens.

        Returns:
            {"hidden": (B, T', D), "mask": (B, T')} with T' = T truncated to the maximum length.
        """
        hidden, mask = self.text_tower(input_ids, attention_mask)
        return {"hidden": hidden, "mask": mask}

    def forward_image_from_prefix(
        self, x: torch.Tensor, outputs: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The unimodal rest of the image tower after :meth:`forward_image_prefix`: with its
        outputs, the same as :meth:`forward_image` of those images.

        Args:
            x: (B, H', W', C) and outputs: the stage outputs, both from :meth:`forward_image_prefix`.

        Returns:
            {"res2".."res5"}: (B, C_s, H_s, W_s) (``outputs`` itself is not modified).
        """
        image = self.image_tower
        outputs = dict(outputs)
        image.run_blocks(x, self._first_fused_block, image.num_blocks, outputs)
        return outputs

    def forward_text_from_prefix(
        self, hidden: torch.Tensor, layer_mask: torch.Tensor | None, attention_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The unimodal rest of the text tower after :meth:`forward_text_prefix` (its three
        outputs): the same as :meth:`forward_text` of those tokens.

        Returns:
            {"hidden": (B, T', D), "mask": (B, T')}.
        """
        text = self.text_tower
        for j in range(self._first_fused_layer, text.num_layers):
            hidden = text.run_layer(j, hidden, layer_mask)
        return {"hidden": hidden, "mask": attention_mask}

    # ------------------------------------------------------------------ fused path
    def forward_prefix(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> FusionPrefix:
        """The part below the first fused pair; each side depends on its own modality only.

        Args:
            images: (B, 3, H, W).
            input_ids: (B, T) token ids.
            attention_mask: (B, T) 1 for real tokens.

        Returns:
            the :class:`FusionPrefix` to hand to :meth:`forward_fused`.
        """
        self._check_batch(images, input_ids, attention_mask)
        x, outputs = self.forward_image_prefix(images)
        hidden, layer_mask, mask = self.forward_text_prefix(input_ids, attention_mask)
        return FusionPrefix(
            image=x,
            text=hidden,
            text_layer_mask=layer_mask,
            attention_mask=mask,
            image_outputs=outputs,
        )

    def forward_image_prefix(
        self, images: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The image side of :meth:`forward_prefix` (independent of the text).

        Args:
            images: (B, 3, H, W).

        Returns:
            (B, H', W', C) input of the first fused block and the stage outputs already complete.
        """
        image = self.image_tower
        outputs: dict[str, torch.Tensor] = {}
        x = image.run_blocks(image.embed(images), 0, self._first_fused_block, outputs)
        return x, outputs

    def forward_text_prefix(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The text side of :meth:`forward_prefix` (independent of the image).

        Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, T) 1 for real tokens.

        Returns:
            (B, T', D) input of the first fused layer, the layer mask and the (B, T') mask.
        """
        text = self.text_tower
        hidden, layer_mask, mask = text.embed(input_ids, attention_mask)
        for j in range(self._first_fused_layer):
            hidden = text.run_layer(j, hidden, layer_mask)
        return hidden, layer_mask, mask

    def forward_fused(
        self, prefix: FusionPrefix
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The fused pairs, in lock step: each side reads the other's pre-step state.

        Args:
            prefix: output of :meth:`forward_prefix` (not modified).

        Returns:
            (image features {"res2".."res5"}, text {"hidden": (B, T', D), "mask": (B, T')}), T'
            the prefix's (truncated) text length.
        """
        image, text = self.image_tower, self.text_tower
        outputs = dict(prefix.image_outputs)
        x, hidden, mask = prefix.image, prefix.text, prefix.attention_mask
        last_block, last_layer = image.num_blocks - 1, text.num_layers - 1
        for step in self.schedule:
            g, j = step.image_block, step.text_layer
            x = image.enter_block(x, g)  # text layers after a patch merging see merged tokens
            image_tokens = x.flatten(1, 2)
            new_x = image.run_block(x, g, text=hidden, text_mask=mask)
            hidden = text.run_layer(
                j,
                hidden,
                prefix.text_layer_mask,
                image_tokens=image_tokens,
                output_norm=self.fused_last_text_norm or j != last_layer,
            )
            x = new_x
            image.exit_block(
                x, g, outputs, apply_norm=self.fused_last_image_norm or g != last_block
            )
        return outputs, {"hidden": hidden, "mask": mask}

    def forward(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        fuse: bool | None = None,
        prefix: FusionPrefix | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """
        Args:
            images: (B, 3, H, W), H and W multiples of :attr:`size_divisibility`.
            input_ids: (B, T) token ids.
            attention_mask: (B, T) 1 for real tokens, 0 for padding.
            fuse: run the fusion (True), or exactly the un-fused towers (False); None uses the
                configured default (MODEL.FIBER.FUSION_ENABLED).
            prefix: the :meth:`forward_prefix` of these inputs, computed earlier (prefix reuse:
                one image prefix for many prompts, one text prefix for many images); the fused
                path then starts from it.

        Returns:
            (image features {"res2".."res5": (B, C_s, H_s, W_s)} after the per-output norms,
            text {"hidden": (B, T', D) last text hidden states, "mask": (B, T') attention mask}),
            T' = T truncated to the text tower's maximum length. On the fused path the last image
            output's norm and the last text layer's output LayerNorm apply only with
            ``fused_last_image_norm`` / ``fused_last_text_norm``.
        """
        fuse = self.fusion_enabled if fuse is None else fuse
        self._check_batch(images, input_ids, attention_mask)
        if not fuse:
            return self.forward_image(images), self.forward_text(input_ids, attention_mask)
        if prefix is None:
            prefix = self.forward_prefix(images, input_ids, attention_mask)
        return self.forward_fused(prefix)

    @staticmethod
    def _check_batch(images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        if images.shape[0] != input_ids.shape[0] or input_ids.shape[0] != attention_mask.shape[0]:
            raise ValueError(
                f"batch sizes differ: images {images.shape[0]}, input_ids {input_ids.shape[0]}, "
                f"attention_mask {attention_mask.shape[0]}"
            )
