"""FIBER's optimizer: AdamW with per-tower learning rates, FIBER's bias/norm rules, full-model clipping.

Parameter-group rule of the fine-grained recipe (spec §6.2), tested on the full parameter name:

* the text tower (``...text_tower...``) trains at ``SOLVER.LANG_LR``; this includes the text-side fusion
  (``crossattention_t2i``, ``alpha_t2i``);
* the image tower (``...image_tower...``) trains at ``BASE_LR * BACKBONE_BODY_LR_FACTOR``; this includes the
  image-side fusion (``*_i2t``);
* everything else (FPN, head, coarse-stage poolers) trains at ``BASE_LR``;
* then any name containing ``bias`` (also ``relative_position_bias_table``, ``bias_lang``, ``bias0``) gets
  ``LR * BIAS_LR_FACTOR`` and ``WEIGHT_DECAY_BIAS``; every other parameter (norm weights and gates included)
  gets ``WEIGHT_DECAY * WEIGHT_DECAY_NORM_FACTOR`` for norms and ``WEIGHT_DECAY`` otherwise.

The coarse stage (spec coarse §4) multiplies the LR of cross-modal and head parameters instead; its rule is
selected by ``SOLVER.PARAM_GROUP_RULE``.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import torch
from detectron2.config import CfgNode

__all__ = [
    "build_fiber_optimizer",
    "fiber_param_groups",
    "coarse_param_groups",
    "OPTIMIZERS",
    "PARAM_GROUP_RULES",
]

logger = logging.getLogger(__name__)

OPTIMIZERS = ("ADAMW", "SGD")  # SOLVER.OPTIMIZER (any case)
PARAM_GROUP_RULES = ("fine", "coarse")  # SOLVER.PARAM_GROUP_RULE

_NORM_SUBSTRINGS = ("norm", "Norm", ".bn.")
_COARSE_CROSS_MODAL = ("cross_modal", "i2t", "t2i")
_COARSE_HEADS = ("mlm_score", "itm_score", "vqa_classifier", "nlvr2_classifier")
_COARSE_NO_DECAY = ("bias", "LayerNorm.weight", "norm.weight", "norm1.", "norm2.")


def _trainable(model: torch.nn.Module):
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        yield name, p


def fiber_param_groups(
    model: torch.nn.Module,
    *,
    base_lr: float,
    lang_lr: float,
    backbone_body_lr_factor: float = 1.0,
    weight_decay: float,
    bias_lr_factor: float = 2.0,
    weight_decay_bias: float = 0.0,
    weight_decay_norm_factor: float = 1.0,
) -> list[dict[str, Any]]:
    """Split trainable parameters into param groups with FIBER's fine-grained rule (parameters of
    equal lr and weight decay share a group).

    Args:
        model: the model (DDP-unwrapped).
        base_lr, lang_lr, backbone_body_lr_factor: see the module docstring.
        weight_decay, bias_lr_factor, weight_decay_bias, weight_decay_norm_factor: see above.

    Returns:
        a list of optimizer param-group dicts ``{"params", "names", "lr", "weight_decay"}``, one per
        distinct (lr, weight decay) pair.
    """
    groups = []
    for name, p in _trainable(model):
        if "text_tower" in name:
            lr = lang_lr
        elif "image_tower" in name:
            lr = base_lr * backbone_body_lr_factor
        else:
            lr = base_lr
        if "bias" in name:
            lr, wd = lr * bias_lr_factor, weight_decay_bias
        elif any(s in name for s in _NORM_SUBSTRINGS):
            wd = weight_decay * weight_decay_norm_factor
        else:
            wd = weight_decay
        groups.append({"params": [p], "lr": lr, "weight_decay": wd, "name": name})
    return _merge_groups(groups)


def coarse_param_groups(
    model: torch.nn.Module,
    *,
    base_lr: float,
    weight_decay: float,
    lr_mult_cross_modal: float = 5.0,
    lr_mult_head: float = 5.0,
) -> list[dict[str, Any]]:
    """Parameter groups of the coarse-grained recipe (spec coarse §4).

    Cross-modal names (``cross_modal``, ``i2t``, ``t2i``) get ``lr_mult_cross_modal``, head names
    (``mlm_score``, ``itm_score``...) get ``lr_mult_head``; names matching the no-decay substrings get no
    weight decay (relative-position tables included; gates, ``temp`` and ``norm_i2t_i.weight`` are decayed).

    Returns:
        a list of optimizer param-group dicts.
    """
    groups = []
    for name, p in _trainable(model):
        if any(s in name for s in _COARSE_HEADS):
            lr = base_lr * lr_mult_head
        elif any(s in name for s in _COARSE_CROSS_MODAL):
            lr = base_lr * lr_mult_cross_modal
        else:
            lr = base_lr
        wd = 0.0 if any(s in name for s in _COARSE_NO_DECAY) else weight_decay
        groups.append({"params": [p], "lr": lr, "weight_decay": wd, "name": name})
    return _merge_groups(groups)


def _merge_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge single-parameter groups with equal (lr, weight_decay); keeps the member names."""
    merged: dict[tuple[float, float], dict[str, Any]] = {}
    for g in groups:
        m = merged.setdefault(
            (g["lr"], g["weight_decay"]),
            {"params": [], "names": [], "lr": g["lr"], "weight_decay": g["weight_decay"]},
        )
        m["params"].extend(g["params"])
        m["names"].append(g["name"])
    return list(merged.values())


def _with_full_model_clipping(optimizer_cls: type, max_norm: float) -> type:
    """Subclass ``optimizer_cls`` so that ``step`` first clips the L2 norm of all gradients together."""

    class FullModelGradientClipping(optimizer_cls):
        def step(self, closure=None):
            params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            return super().step(closure=closure)

    FullModelGradientClipping.__name__ = optimizer_cls.__name__ + "WithFullModelClipping"
    return FullModelGradientClipping


def build_fiber_optimizer(cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Build the optimizer named by ``SOLVER.OPTIMIZER`` with the groups of ``SOLVER.PARAM_GROUP_RULE``.

    ``SOLVER.CLIP_GRADIENTS`` with ``CLIP_TYPE "full_model"`` clips the joint L2 norm of all gradients
    (FIBER's pretraining); "value"/"norm" use detectron2's per-parameter clipping.
    """
    s = cfg.SOLVER
    if s.PARAM_GROUP_RULE == "fine":
        groups = fiber_param_groups(
            model,
            base_lr=s.BASE_LR,
            lang_lr=s.LANG_LR,
            backbone_body_lr_factor=s.BACKBONE_BODY_LR_FACTOR,
            weight_decay=s.WEIGHT_DECAY,
            bias_lr_factor=s.BIAS_LR_FACTOR,
            weight_decay_bias=s.WEIGHT_DECAY_BIAS,
            weight_decay_norm_factor=s.WEIGHT_DECAY_NORM_FACTOR,
        )
    elif s.PARAM_GROUP_RULE == "coarse":
        groups = coarse_param_groups(
            model,
            base_lr=s.BASE_LR,
            weight_decay=s.WEIGHT_DECAY,
            lr_mult_cross_modal=s.LR_MULT_CROSS_MODAL,
            lr_mult_head=s.LR_MULT_HEAD,
        )
    else:
        raise ValueError(
            f"SOLVER.PARAM_GROUP_RULE must be one of {PARAM_GROUP_RULES}, got {s.PARAM_GROUP_RULE!r}"
        )
    if not groups:
        raise ValueError("The model has no trainable parameters.")

    name = s.OPTIMIZER.upper()
    if name == "ADAMW":
        # torch's AdamW for both stages. The original's coarse stage uses the AdamW of transformers
        # (since removed there), which adds eps before the bias correction of the second moment
        # (an effective eps / sqrt(1 - beta2^t): 7x at the first step with beta2 0.98, 1.01x by
        # step 1000) and decays the weights after the update instead of before (a difference of
        # lr x weight decay x the update). Both matter only in the first few hundred steps, which
        # the coarse recipes spend in a 10 % warmup from 0.
        optimizer_cls, kwargs = torch.optim.AdamW, {"betas": tuple(s.BETAS), "eps": s.EPS}
    elif name == "SGD":
        optimizer_cls, kwargs = torch.optim.SGD, {"momentum": s.MOMENTUM, "nesterov": s.NESTEROV}
    else:
        raise ValueError(f"SOLVER.OPTIMIZER must be one of {OPTIMIZERS}, got {s.OPTIMIZER!r}")
    if s.FUSED:
        kwargs["fused"] = True

    clip = s.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        optimizer_cls = _with_full_model_clipping(optimizer_cls, clip.CLIP_VALUE)
        optimizer = optimizer_cls(groups, lr=s.BASE_LR, **kwargs)
    else:
        from detectron2.solver.build import maybe_add_gradient_clipping

        optimizer = maybe_add_gradient_clipping(cfg, optimizer_cls)(groups, lr=s.BASE_LR, **kwargs)
    for g in optimizer.param_groups:
        g.setdefault("initial_weight_decay", g["weight_decay"])
    logger.info("Optimizer %s with %d parameter groups", type(optimizer).__name__, len(groups))
    return optimizer
