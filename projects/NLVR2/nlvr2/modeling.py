"""``FIBERNLVR2``: NLVR2 with two fused passes per example (coarse spec §5.4).

(sentence, image_0) and (sentence, image_1) each give ``cls_feats`` (2D); the head ``nlvr2_classifier``
reads [cls_0 ; cls_1] (4D): Linear(4D, 2D), LayerNorm, GELU, Linear(2D, 2); loss: cross-entropy
(label 1 = "True"). The two passes are independent; they run as one batch of 2B.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY

from fiber_d2.modeling.meta_arch import FIBERFusedTask, init_head, task_head

__all__ = ["FIBERNLVR2", "nlvr2_loss"]


def nlvr2_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy. logits: (B, 2); labels: (B,) in {0, 1}."""
    return F.cross_entropy(logits, labels)


@META_ARCH_REGISTRY.register()
class FIBERNLVR2(FIBERFusedTask):
    """Inputs from :class:`nlvr2.NLVR2DatasetMapper`. Training returns ``{"loss_nlvr2"}``; inference
    returns per record ``{"nlvr2_logits": (2,), "prediction": 0 or 1}``."""

    STAGE_HEADS = ("nlvr2_classifier.",)

    @configurable
    def __init__(self, **kwargs):
        """
        Args:
            kwargs: the arguments of :class:`fiber_d2.modeling.meta_arch.FIBERCoarse`.
        """
        super().__init__(**kwargs)
        width = 2 * self.text_dim
        self.nlvr2_classifier = task_head(2 * width, width, 2)
        init_head(self.nlvr2_classifier)

    def pair_logits(self, image_0, image_1, input_ids, attention_mask) -> torch.Tensor:
        """(B, 2) logits of (B, 3, S, S) image pairs and (B, T) sentences."""
        cls = self.cls_feats(
            torch.cat([image_0, image_1]),
            input_ids.repeat(2, 1),
            attention_mask.repeat(2, 1),
        )
        return self.classify_pairs(cls)

    def classify_pairs(self, cls: torch.Tensor) -> torch.Tensor:
        """(2B, 2D) ``cls_feats`` of the B (sentence, image_0) then the B (sentence, image_1) passes
        -> (B, 2) logits."""
        b = cls.shape[0] // 2
        return self.nlvr2_classifier(torch.cat([cls[:b], cls[b:]], dim=-1))

    def forward(self, batched_inputs: list[dict]):
        logits = self.classify_pairs(self.cls_feats_of(batched_inputs, ("image_0", "image_1")))
        if self.training:
            labels = torch.tensor([int(x["label"]) for x in batched_inputs], device=self.device)
            return {"loss_nlvr2": nlvr2_loss(logits, labels)}
        return [{"nlvr2_logits": row, "prediction": int(row.argmax())} for row in logits.detach()]
