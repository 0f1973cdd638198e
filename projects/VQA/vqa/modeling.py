"""``FIBERVQA``: VQAv2 on the fused ``cls_feats`` (coarse spec §5.3).

Head ``vqa_classifier``: Linear(2D, 2D), LayerNorm, GELU, Linear(2D, V) on [text pooled ; image pooled];
loss: mean binary cross-entropy with logits against the soft targets, times V (= summing over answers
and averaging over the batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY

from fiber_d2.modeling.meta_arch import FIBERFusedTask, init_head, task_head

from .vocab import answer_vocab

__all__ = ["FIBERVQA", "vqa_loss"]


def vqa_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits (mean over B x V) times V.

    Args:
        logits: (B, V); targets: (B, V) soft scores in [0, 1].
    """
    return F.binary_cross_entropy_with_logits(logits, targets) * targets.shape[1]


@META_ARCH_REGISTRY.register()
class FIBERVQA(FIBERFusedTask):
    """Inputs from :class:`vqa.VQADatasetMapper`. Training returns ``{"loss_vqa"}``; inference returns
    per record ``{"vqa_logits": (V,), "answer_index": int}``."""

    STAGE_HEADS = ("vqa_classifier.",)

    @configurable
    def __init__(self, *, num_answers: int, **kwargs):
        """
        Args:
            num_answers: V, the answer vocabulary size.
            kwargs: the arguments of :class:`fiber_d2.modeling.meta_arch.FIBERCoarse`.
        """
        super().__init__(**kwargs)
        width = 2 * self.text_dim
        self.vqa_classifier = task_head(width, width, num_answers)
        init_head(self.vqa_classifier)

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret["num_answers"] = len(answer_vocab(cfg))
        return ret

    def forward(self, batched_inputs: list[dict]):
        logits = self.vqa_classifier(self.cls_feats_of(batched_inputs))
        if self.training:
            targets = torch.stack([x["vqa_targets"] for x in batched_inputs]).to(self.device)
            return {"loss_vqa": vqa_loss(logits, targets)}
        return [{"vqa_logits": row, "answer_index": int(row.argmax())} for row in logits.detach()]
