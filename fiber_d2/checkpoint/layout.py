"""Which key layout a checkpoint is in, and the one conversion of ORIGINAL FIBER files.

``tools/convert_fiber_checkpoint.py`` and :class:`~fiber_d2.checkpoint.FIBERCheckpointer` (when an
original file is given as ``MODEL.WEIGHTS``) both go through :func:`convert_original`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .convert import (
    ConversionReport,
    convert_coarse_state_dict,
    convert_fine_state_dict,
    unwrap_state_dict,
)

__all__ = [
    "FINE",
    "COARSE",
    "META_ARCH_TARGET",
    "original_layout",
    "fiber_d2_layout",
    "convert_original",
]

FINE, COARSE = "fine", "coarse"
# meta-architecture -> conversion target
META_ARCH_TARGET = {"FIBER": FINE, "FIBERCoarse": COARSE}

_FINE_PREFIXES = ("fusion_backbone.", "rpn.")
_COARSE_PREFIXES = ("vit_model.", "text_transformer.")
# keys of fiber_d2's own models (detector, coarse model, their heads)
# top-level modules of fiber_d2's models: the detector, the coarse stage, its task models and the
# Demo's image-tower pre-training
_D2_PREFIXES = (
    "backbone.",
    "head.",
    "image_norm.",
    "itm_score.",
    "mlm_score.",
    "cross_modal_",
    "queue.",
    "itc_image_bn.",
    "itc_text_bn.",
    "cls_bn.",
    "vqa_classifier.",
    "nlvr2_classifier.",
    "rank_output.",
    "classifiers.",
)


def _keys(checkpoint: Mapping, use_ema: bool = False) -> list[str]:
    try:
        state, _ = unwrap_state_dict(checkpoint, use_ema=use_ema)
    except (TypeError, KeyError):
        return []
    keys = [str(k) for k in state]
    return [k[len("module.") :] if k.startswith("module.") else k for k in keys]


def original_layout(checkpoint, use_ema: bool = False) -> str | None:
    """``"fine"`` / ``"coarse"`` when ``checkpoint`` is in the ORIGINAL FIBER key layout, else None.

    Fine: ``fusion_backbone.`` / ``rpn.`` keys (GeneralizedVLRCNN); coarse: ``vit_model.`` /
    ``text_transformer.`` keys (FIBERTransformerSS). A leading ``module.`` is ignored.
    """
    if not isinstance(checkpoint, Mapping):
        return None
    keys = _keys(checkpoint, use_ema)
    if any(k.startswith(_FINE_PREFIXES) for k in keys):
        return FINE
    if any(k.startswith(_COARSE_PREFIXES) for k in keys):
        return COARSE
    return None


def fiber_d2_layout(checkpoint) -> bool:
    """Whether ``checkpoint`` is already a fiber_d2 file (provenance entry, or fiber_d2 key names
    and no original ones)."""
    if not isinstance(checkpoint, Mapping):
        return False
    if "__fiber_d2__" in checkpoint:
        return True
    keys = _keys(checkpoint)
    return (
        bool(keys)
        and original_layout(checkpoint) is None
        and all(k.startswith(_D2_PREFIXES) or k == "temp" for k in keys)
    )


def convert_original(
    checkpoint: Mapping,
    *,
    stage: str,
    target: str,
    model_state: Mapping | None = None,
    use_ema: bool = False,
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Convert an ORIGINAL FIBER checkpoint to fiber_d2 keys.

    Args:
        checkpoint: the loaded file.
        stage: its layout, ``"fine"`` or ``"coarse"`` (see :func:`original_layout`).
        target: ``"fine"`` (the FIBER detector) or ``"coarse"`` (FIBERCoarse).
        model_state: the target model's state dict (tensors or meta tensors), for shape checks.
        use_ema: convert the ``model_ema`` entry.

    Returns:
        (state dict, :class:`~fiber_d2.checkpoint.convert.ConversionReport`).

    Raises:
        ValueError: a fine-grained file with ``target="coarse"``, or an unknown stage.
    """
    if stage == FINE:
        if target != FINE:
            raise ValueError("a fine-grained checkpoint converts to the FIBER detector only")
        return convert_fine_state_dict(checkpoint, model_state=model_state, use_ema=use_ema)
    if stage == COARSE:
        return convert_coarse_state_dict(
            checkpoint, target=target, model_state=model_state, use_ema=use_ema
        )
    raise ValueError(f"stage must be 'fine' or 'coarse', got {stage!r}")
