"""``FIBERFusedTask``: the base of the downstream models that read the fused ``cls_feats`` (VQA, NLVR2)
and of the caption model (``projects/Captioning``).

Coarse spec §1.7 / §2: the fused forward ends in ``cls_feats`` = [text pooled ; image pooled] (2D wide).
A task model is :class:`FIBERCoarse` without the pre-training heads and queue (``mlm_score``,
``itm_score``, ``temp``, the ITC queue), plus its own head. It keeps the ITC transforms and poolers, as
the original's task models do, so a coarse checkpoint (converted or trained here) loads with only the
pre-training heads unused, and a released task checkpoint loads with nothing missing or unexpected.

Also here: :func:`task_head`, the original's head shape (Linear, LayerNorm, GELU, Linear; keys
``{0,1,3}.*``); :func:`init_head` (from fiber_coarse) is re-exported.
"""

from __future__ import annotations

import torch
from torch import nn

from .fiber_coarse import FIBERCoarse, init_head

__all__ = ["FIBERFusedTask", "task_head", "init_head"]


def task_head(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """Linear(in, hidden), LayerNorm(hidden), GELU, Linear(hidden, out): the VQA / NLVR2 head."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, out_dim)
    )


class FIBERFusedTask(FIBERCoarse):
    """:class:`FIBERCoarse` without pre-training heads; subclasses add a head and ``forward``.

    Constructed with the arguments of :class:`FIBERCoarse` (its ``losses`` are ignored). Subclasses
    name their head's parameter prefixes in ``STAGE_HEADS``: a checkpoint without them (a coarse
    pre-training checkpoint) still counts as a complete load for the strict-weights check. A subclass
    that builds its own heads instead of the pre-training ones (captioning) overrides
    :meth:`FIBERCoarse._build_heads` and empties ``_PRETRAIN_ONLY``.
    """

    STAGE_HEADS: tuple[str, ...] = ()
    # built by FIBERCoarse._build_heads, then dropped (building them keeps the init draws of the
    # task models as they were)
    _PRETRAIN_ONLY: tuple[str, ...] = ("mlm_score", "itm_score", "queue", "temp")

    def __init__(self, *, cls_batch_norm: bool = False, **kwargs):
        """
        Args:
            cls_batch_norm: standardise each ``cls_feats`` dimension over the batch (running
                statistics at inference; no parameters) before the task head. A switch for
                from-scratch towers (MODEL.COARSE.CLS_BATCH_NORM, ``configs/Demo/`` task configs
                only): their ``<s>`` state varies across texts by about 1e-3 of its size, and the
                pooled image by about a tenth, so the head sees nearly the same input for every
                example and learns only the answer prior (README, "Vision-language tasks"). Off
                (the original) for converted or pre-trained weights.
            kwargs: the arguments of :class:`FIBERCoarse` (its ``losses`` are ignored).
        """
        kwargs["losses"], kwargs["loss_weights"] = [], {}
        super().__init__(**kwargs)
        for name in self._PRETRAIN_ONLY:
            delattr(self, name)
        # the ITC batch norms (a from-scratch Demo switch, MODEL.COARSE.ITC_BATCH_NORM) serve ITC only
        self.itc_image_bn = self.itc_text_bn = None
        self.text_dim = self.cross_modal_text_transform.out_features
        # eps far below the text half's variance across texts (about 1e-7 for the Demo's towers)
        self.cls_bn = (
            nn.BatchNorm1d(2 * self.text_dim, eps=1e-9, affine=False) if cls_batch_norm else None
        )

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret["cls_batch_norm"] = cfg.MODEL.COARSE.CLS_BATCH_NORM
        return ret

    def images(self, batched_inputs: list[dict], key: str = "image") -> torch.Tensor:
        """Normalised (B, 3, S, S) float images from ``batched_inputs[i][key]`` (uint8, one size)."""
        return self._images([{"image": x[key]} for x in batched_inputs])

    def text(self, batched_inputs: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) ``input_ids`` and ``attention_mask`` stacked on the model's device."""
        ids = torch.stack([x["input_ids"] for x in batched_inputs]).to(self.device)
        mask = torch.stack([x["attention_mask"] for x in batched_inputs]).to(self.device)
        return ids, mask

    def cls_feats(self, images, input_ids, attention_mask) -> torch.Tensor:
        """Fused forward (coarse spec §1.7): (B, 3, S, S), (B, T), (B, T) -> (B, 2D), batch-standardised
        when ``cls_batch_norm`` is on."""
        feats = self.fused(images, input_ids, attention_mask)["cls_feats"]
        return feats if self.cls_bn is None else self.cls_bn(feats)

    def forward(self, batched_inputs: list[dict]):  # pragma: no cover - abstract
        raise NotImplementedError
