"""``FIBERRetrievalITM``: FIBERCoarse fine-tuned for retrieval with random-negative ITM (coarse spec §3.5).

Training batch of B samples, each (image, caption, false_image) from
:class:`~.mapper.FalseImageCaptionMapper`: floor(B/2) rows keep their own image (label 1, "match") and the
other rows use their false image (label 0), the two kinds at randomly permuted positions. One fused pass
over the B pairs; cross-entropy of ``itm_score`` over the B rows (same head and loss as §3.4). ITC and MLM
are off in this stage, as in the original ITM fine-tuning. Inference is FIBERCoarse's (ITC embeddings);
the ITM scores are computed by the retrieval evaluator's re-ranking.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY

from fiber_d2.config import ConfigError
from fiber_d2.modeling.meta_arch.fiber_coarse import FIBERCoarse

__all__ = ["FIBERRetrievalITM", "random_negative_labels"]

logger = logging.getLogger(__name__)


def random_negative_labels(
    batch_size: int, *, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """ITM labels of a random-negative batch: floor(B/2) ones (positives), the rest zeros, shuffled.

    Args:
        batch_size: B >= 1.
        generator: optional RNG (torch's global one by default).
        device: device of the result.

    Returns:
        (B,) long labels, 1 = keep the sample's own image, 0 = use its false image.
    """
    if batch_size < 1:
        raise ValueError(f"ITM batch size must be >= 1, got {batch_size}")
    labels = torch.zeros(batch_size, dtype=torch.long)
    labels[: batch_size // 2] = 1
    return labels[torch.randperm(batch_size, generator=generator)].to(device)


@META_ARCH_REGISTRY.register()
class FIBERRetrievalITM(FIBERCoarse):
    """FIBERCoarse whose training objective is random-negative ITM only (see module docstring)."""

    HARD_NEGATIVE_ITM = False  # random negatives: no raw-input queue
    # its evaluation scores pairs with this head: a file without it is refused for evaluation
    # (FIBERCheckpointer), though it is a small share of the weights
    INFERENCE_HEADS = ("itm_score.",)

    @configurable
    def __init__(self, **kwargs):
        """
        Args:
            kwargs: the arguments of :class:`fiber_d2.modeling.meta_arch.fiber_coarse.FIBERCoarse`;
                ``losses`` must be ``["itm"]``.
        """
        super().__init__(**kwargs)
        if self.losses != ["itm"]:
            raise ConfigError(
                f"FIBERRetrievalITM trains random-negative ITM only: MODEL.COARSE.LOSSES must be"
                f" ['itm'], got {self.losses}"
            )
        self.generator: torch.Generator | None = None  # label shuffling; torch's global RNG if None
        frozen = self._freeze_unused()
        logger.info("FIBERRetrievalITM: %d parameter tensors outside the ITM path frozen", frozen)

    def _freeze_unused(self) -> int:
        """Freeze what random-negative ITM never reaches: the ITC (unimodal) poolers, ``image_norm``,
        ``temp``, the MLM head and, when the fused path skips it, the last text layer's output
        LayerNorm. In the original they get no gradient in this stage and keep their loaded values; frozen
        here they also stay out of the optimizer and of DDP's gradient reduction. Evaluation's ITC
        pre-filter uses them as loaded.

        Returns:
            the number of parameter tensors frozen.
        """
        modules = [
            self.image_norm,
            self.cross_modal_text_transform_itc,
            self.cross_modal_image_transform_itc,
            self.cross_modal_text_pooler_itc,
            self.cross_modal_image_pooler_itc,
            self.mlm_score,
        ]
        if not self.backbone.fused_last_text_norm:
            modules.append(self.backbone.text_tower.model.encoder.layer[-1].output.LayerNorm)
        params = [self.temp] + [p for m in modules for p in m.parameters()]
        for p in params:
            p.requires_grad_(False)
        return len(params)

    def forward(self, batched_inputs: list[dict]):
        """Training: ``{"loss_itm": ...}``. Inference: FIBERCoarse's embeddings per record.

        Args:
            batched_inputs: mapped records; in training each has ``image`` and ``false_image``
                (3, S, S), ``input_ids`` and ``attention_mask`` (T,).
        """
        if not self.training:
            return self.inference(batched_inputs)
        for x in batched_inputs:
            if "false_image" not in x:
                raise KeyError(
                    f"record {x.get('image_id', x.get('file_name'))} has no 'false_image'; train"
                    " FIBERRetrievalITM with the Retrieval project's FalseImageCaptionMapper"
                )
        images = self._images(batched_inputs)
        false_images = self._images([{"image": x["false_image"]} for x in batched_inputs])
        if images.shape != false_images.shape:
            raise ValueError(
                f"false images {tuple(false_images.shape)} differ from images {tuple(images.shape)}"
            )
        ids = torch.stack([x["input_ids"] for x in batched_inputs]).to(self.device)
        mask = torch.stack([x["attention_mask"] for x in batched_inputs]).to(self.device)
        labels = random_negative_labels(len(batched_inputs), generator=self.generator)
        labels = labels.to(self.device)
        pair_images = torch.where(labels.bool()[:, None, None, None], images, false_images)
        logits = self.itm_logits(pair_images, ids, mask)
        return {"loss_itm": F.cross_entropy(logits, labels) * self.loss_weights["itm"]}
