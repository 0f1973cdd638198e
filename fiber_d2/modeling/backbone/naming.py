"""State-dict key mapping from the original FIBER checkpoints to fiber_d2's backbone names
(fine-grained spec §7.2, coarse spec §6.2-6.3).

=================================================================  ==========================================
original key (after an optional ``module.``)                         fiber_d2 key
=================================================================  ==========================================
fine ``fusion_backbone.backbone.body.X``, coarse ``vit_model.X``     ``{backbone_prefix}image_tower.X``
  ``...layers.{s}.downsample.*`` (end of stage s)                    ``...layers.{s+1}.downsample.*`` (timm)
  ``...norm{k}.*`` (fine per-output norms)                           ``...norm{k}.*``
  ``vit_model.norm.*`` (coarse final norm)                           ``...norm{num_stages-1}.*``
  ``relative_position_index``, ``attn_mask`` buffers, ``head.*``     dropped (recomputed / unused)
fine ``fusion_backbone.backbone.fpn.fpn_inner{k}.*``                ``{fpn_prefix}fpn_lateral{k+1}.*``
fine ``fusion_backbone.backbone.fpn.fpn_layer{k}.*``                ``{fpn_prefix}fpn_output{k+1}.*``
fine ``fusion_backbone.backbone.fpn.top_blocks.p6/p7.*``            ``{fpn_prefix}top_block.p6/p7.*``
fine ``fusion_backbone.language_backbone.body.model.X``,            ``{backbone_prefix}text_tower.model.X``
coarse ``text_transformer.X``
  ``embeddings.position_ids`` / ``token_type_ids`` buffers          dropped (non-persistent in transformers 5)
  ``encoder.layer.{j}.crossattention_t2i.output.LayerNorm.*``        dropped (unused in the original)
  ``encoder.layer.{j}.alpha_t2i`` of a layer without fusion          dropped (coarse has it in every layer)
  ``pooler.*``                                                        dropped (FIBER has no text pooler)
anything else (head ``rpn.*``, coarse heads/queues/poolers)           None (not a backbone key)
=================================================================  ==========================================

The default prefixes are those of the fine-grained detector: ``backbone`` is the
:class:`~fiber_d2.modeling.backbone.fpn.FIBERFPN` and ``backbone.bottom_up`` the fused backbone.
"""

from __future__ import annotations

import logging
import re

__all__ = [
    "FINE_IMAGE_PREFIX",
    "FINE_FPN_PREFIX",
    "FINE_TEXT_PREFIX",
    "COARSE_IMAGE_PREFIX",
    "COARSE_TEXT_PREFIX",
    "original_to_fiber_d2_key",
]

logger = logging.getLogger(__name__)

FINE_IMAGE_PREFIX = "fusion_backbone.backbone.body."
FINE_FPN_PREFIX = "fusion_backbone.backbone.fpn."
FINE_TEXT_PREFIX = "fusion_backbone.language_backbone.body.model."
COARSE_IMAGE_PREFIX = "vit_model."
COARSE_TEXT_PREFIX = "text_transformer."

_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")
_FPN = re.compile(r"^fpn_(inner|layer)(\d+)\.")
_TEXT_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.")


def _image_key(rest: str, num_stages: int) -> str | None:
    if (
        rest.endswith("relative_position_index")
        or rest.endswith("attn_mask")
        or rest.startswith("head.")
    ):
        return None
    match = _DOWNSAMPLE.match(rest)
    if match:
        return f"layers.{int(match.group(1)) + 1}.downsample." + rest[match.end() :]
    if rest.startswith("norm."):
        return f"norm{num_stages - 1}." + rest[len("norm.") :]
    return rest


def _fpn_key(rest: str) -> str | None:
    match = _FPN.match(rest)
    if match:
        kind = "lateral" if match.group(1) == "inner" else "output"
        return f"fpn_{kind}{int(match.group(2)) + 1}." + rest[match.end() :]
    if rest.startswith("top_blocks."):
        return "top_block." + rest[len("top_blocks.") :]
    return None


def _text_key(rest: str, first_fused_layer: int) -> str | None:
    if rest.startswith("pooler.") or rest in (
        "embeddings.position_ids",
        "embeddings.token_type_ids",
    ):
        return None
    match = _TEXT_LAYER.match(rest)
    if match:
        inner = rest[match.end() :]
        if inner.startswith("crossattention_t2i.output.LayerNorm."):
            return None
        if inner == "alpha_t2i" and int(match.group(1)) < first_fused_layer:
            return None
    return rest


def original_to_fiber_d2_key(
    key: str,
    *,
    backbone_prefix: str = "backbone.bottom_up.",
    fpn_prefix: str = "backbone.",
    num_stages: int = 4,
    num_text_layers: int = 12,
    num_fusion_layers: int = 6,
    final_norm: str | None = None,
) -> str | None:
    """Map one original FIBER (fine-grained or coarse) state-dict key to fiber_d2's name.

    Args:
        key: original key, optionally with a leading ``module.``.
        backbone_prefix: where the :class:`FusedSwinRoberta` sits in the target model.
        fpn_prefix: where the :class:`FIBERFPN` sits in the target model.
        num_stages: Swin stages (the coarse final ``norm`` goes to the last output norm).
        num_text_layers: RoBERTa layers.
        num_fusion_layers: fused (top) layers; ``alpha_t2i`` below them is dropped.
        final_norm: full target module name of the coarse final norm (``vit_model.norm``), e.g.
            ``"image_norm"`` when the model keeps it outside the tower; None maps it to the
            tower's last output norm.

    Returns:
        the fiber_d2 key, or None for keys that are dropped or belong outside the backbone
        (see the module docstring for the table).
    """
    if key.startswith("module."):
        key = key[len("module.") :]
    first_fused = num_text_layers - num_fusion_layers
    for prefix in (FINE_IMAGE_PREFIX, COARSE_IMAGE_PREFIX):
        if key.startswith(prefix):
            rest = key[len(prefix) :]
            if final_norm is not None and rest.startswith("norm."):
                return f"{final_norm}.{rest[len('norm.'):]}"
            mapped = _image_key(rest, num_stages)
            return None if mapped is None else backbone_prefix + "image_tower." + mapped
    if key.startswith(FINE_FPN_PREFIX):
        mapped = _fpn_key(key[len(FINE_FPN_PREFIX) :])
        return None if mapped is None else fpn_prefix + mapped
    for prefix in (FINE_TEXT_PREFIX, COARSE_TEXT_PREFIX):
        if key.startswith(prefix):
            mapped = _text_key(key[len(prefix) :], first_fused)
            return None if mapped is None else backbone_prefix + "text_tower.model." + mapped
    return None
