"""``FIBER``: the fine-grained grounding detector (fused backbone -> FPN -> DyHead -> token alignment).

Batched inputs are detectron2's (``image``, ``instances``, ``height``, ``width``) plus the text side that the
dataset mapper tokenised once:

* ``input_ids``, ``attention_mask``: LongTensor (T,), or (K, T) for K prompt chunks (LVIS evaluation);
* ``instances.gt_positive_map``: BoolTensor (G, T), the tokens of each box's phrase (training);
* ``label_token_map``: BoolTensor (L, T) (or (K, L, T)), the tokens of each output label (inference).

Training returns a dict of losses; inference returns ``[{"instances": Instances}]`` with ``pred_boxes``,
``scores``, ``pred_classes`` (the label index) at the original image size, so detectron2's evaluators and
Visualizer work unchanged.

Box conventions: FIBER's anchors, box coder, ATSS IoUs and NMS use the legacy "+1" convention (a box's
width is ``x2 - x1 + 1``). The conversion happens here only, with the original's arithmetic: ground truth
(moved by the mapper as the original moves legacy boxes) gets ``x2 - 1, y2 - 1``, and predictions are
rescaled to the image and then get ``+1`` (:func:`~fiber_d2.modeling.head.postprocess.to_image_frame`).
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.backbone import Backbone
from detectron2.structures import ImageList, Instances
from torch import nn

from ...config import ConfigError
from ...text import padded_text_length, trim_text
from ..backbone.fused import FusionPrefix
from ..head import ATSSLossComputation, GroundingHead, generate_anchors, ground_inference
from ..head.postprocess import to_image_frame

__all__ = ["FIBER"]

logger = logging.getLogger(__name__)

_TEXT_PREFIX_CACHE_SIZE = 256  # chunk groups whose text prefix is kept (LVIS: 8 at 4 per group)


@META_ARCH_REGISTRY.register()
class FIBER(nn.Module):
    """The FIBER fine-grained model (phrase grounding / open-vocabulary detection)."""

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        head: GroundingHead,
        loss: ATSSLossComputation,
        in_features: list[str],
        anchor_sizes: list[int],
        anchor_strides: list[int],
        pixel_mean: list[float],
        pixel_std: list[float],
        score_threshold: float = 0.05,
        pre_nms_top_n: int = 1000,
        nms_threshold: float = 0.6,
        detections_per_img: int = 100,
        score_agg: str = "MEAN",
        max_neg_per_batch: float = 0.1,
        pad_to_max_query_len: bool = False,
        prefix_reuse: bool = True,
        chunk_batch_size: int = 4,
        amp_dtype: str = "",
    ):
        """
        Args:
            backbone: the fused backbone with FPN; called as ``backbone(images, input_ids, mask)`` and
                returning ``(features, text)``.
            head: the grounding head (DyHead tower + box / centerness / token-alignment outputs).
            loss: ATSS assignment and losses.
            in_features: FPN levels fed to the head, finest first (p3..p7).
            anchor_sizes, anchor_strides: one square anchor per location and level.
            pixel_mean, pixel_std: input normalisation (in ``INPUT.FORMAT`` channel order).
            score_threshold, pre_nms_top_n, nms_threshold, detections_per_img, score_agg: inference.
            max_neg_per_batch: a batch whose share of images without boxes exceeds this is skipped,
                as FIBER skips it: its losses are zeroed (the graph stays whole for DDP) and
                ``batch_skipped`` tells the trainer to take no optimiser step.
            pad_to_max_query_len: run text at its tokenized length T; False cuts each batch to
                :func:`fiber_d2.text.padded_text_length` (same outputs on the real tokens).
            prefix_reuse: chunked prompts (K, T) run the text-independent image prefix once per
                image and the image-independent text prefix once per chunk (cached until the next
                ``train()`` / ``eval()`` / ``load_state_dict``), then the fused top, FPN and head
                per chunk; False runs the whole model once per chunk.
            chunk_batch_size: chunks run as one batch with ``prefix_reuse``.
            amp_dtype: "" (fp32), "bfloat16" or "float16": inference under autocast.
        """
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.loss = loss
        self.in_features = list(in_features)
        self.anchor_sizes = list(anchor_sizes)
        self.anchor_strides = list(anchor_strides)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.score_threshold = score_threshold
        self.pre_nms_top_n = pre_nms_top_n
        self.nms_threshold = nms_threshold
        self.detections_per_img = detections_per_img
        self.score_agg = score_agg
        self.max_neg_per_batch = max_neg_per_batch
        self.batch_skipped = False  # set by every training forward
        self.pad_to_max_query_len = pad_to_max_query_len
        self.prefix_reuse = prefix_reuse
        if chunk_batch_size < 1:
            raise ConfigError(f"TEST.CHUNK_BATCH_SIZE must be >= 1, got {chunk_batch_size}")
        self.chunk_batch_size = chunk_batch_size
        if amp_dtype not in ("", "bfloat16", "float16"):
            raise ConfigError(f"TEST.AMP_DTYPE must be bfloat16 or float16, got {amp_dtype!r}")
        self.amp_dtype = amp_dtype
        self._text_prefixes: OrderedDict[tuple, tuple] = OrderedDict()
        self.register_load_state_dict_post_hook(lambda module, _keys: module.clear_text_cache())

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        return {
            "backbone": backbone,
            "head": GroundingHead(cfg),
            "loss": ATSSLossComputation(cfg),
            # every FPN level, finest first (p3..p7 for FIBER's res3..res5 inputs)
            "in_features": sorted(shapes, key=lambda name: shapes[name].stride),
            "anchor_sizes": cfg.MODEL.ATSS.ANCHOR_SIZES,
            "anchor_strides": cfg.MODEL.ATSS.ANCHOR_STRIDES,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "score_threshold": cfg.MODEL.ATSS.INFERENCE_TH,
            "pre_nms_top_n": cfg.MODEL.ATSS.PRE_NMS_TOP_N,
            "nms_threshold": cfg.MODEL.ATSS.NMS_TH,
            "detections_per_img": cfg.MODEL.ATSS.DETECTIONS_PER_IMG,
            "score_agg": cfg.MODEL.DYHEAD.SCORE_AGG,
            "max_neg_per_batch": cfg.SOLVER.MAX_NEG_PER_BATCH,
            "pad_to_max_query_len": cfg.INPUT.PAD_TO_MAX_QUERY_LEN,
            "prefix_reuse": cfg.TEST.PREFIX_REUSE,
            "chunk_batch_size": cfg.TEST.CHUNK_BATCH_SIZE,
            "amp_dtype": cfg.TEST.AMP_DTYPE if cfg.TEST.AMP else "",
        }

    def train(self, mode: bool = True):
        """Switch mode; drops the cached text prefixes (the weights may change in between)."""
        self.clear_text_cache()
        return super().train(mode)

    def clear_text_cache(self) -> None:
        """Forget the text prefixes cached by chunked inference."""
        self._text_prefixes.clear()

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    # ------------------------------------------------------------------ shared steps
    def preprocess_image(self, batched_inputs: list[dict]) -> ImageList:
        """Normalise and zero-pad images (bottom/right) to the backbone's size divisibility."""
        images = [
            (x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs
        ]
        return ImageList.from_tensors(images, self.backbone.size_divisibility)

    def _stack_text(self, batched_inputs: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = {tuple(x["input_ids"].shape) for x in batched_inputs}
        if len(lengths) != 1:
            raise ValueError(
                f"all samples of a batch need the same text length, got {sorted(lengths)}"
            )
        ids = torch.stack([x["input_ids"] for x in batched_inputs]).to(self.device)
        mask = torch.stack([x["attention_mask"] for x in batched_inputs]).to(self.device)
        return trim_text(self.text_length(mask), ids, mask)

    def text_length(self, attention_mask: torch.Tensor) -> int:
        """Token length a batch runs at (see ``pad_to_max_query_len``)."""
        return padded_text_length(attention_mask, self.pad_to_max_query_len)

    def _run(self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, prefix=None):
        """Backbone (from ``prefix`` when given) + head. Returns (head outputs, anchors per level)."""
        features, text = self.backbone(images, ids, mask, prefix=prefix)
        feats = [features[f] for f in self.in_features]
        outputs = self.head(feats, text["embedded"])
        anchors = generate_anchors(
            [tuple(f.shape[-2:]) for f in feats],
            self.anchor_strides,
            self.anchor_sizes,
            self.device,
        )
        return outputs, anchors

    # ------------------------------------------------------------------ forward
    def forward(self, batched_inputs: list[dict]):
        """
        Args:
            batched_inputs: a list (one per image) of mapper outputs (see the module docstring).

        Returns:
            training: dict of scalar losses (``loss_dot_product_token``, ``loss_reg``,
            ``loss_centerness``); inference: ``[{"instances": Instances}]``.
        """
        if any("input_ids" not in x for x in batched_inputs):
            # e.g. detectron2's DefaultPredictor, which passes images only
            # or detectron2's DefaultTrainer, whose DatasetMapper passes images and boxes only
            raise ValueError(
                "FIBER needs a text prompt with every image ('input_ids', 'attention_mask'"
                + ("" if self.training else ", 'label_token_map'")
                + "); "
                + (
                    "train with fiber_d2.engine.FIBERTrainer (its loaders map the text), not "
                    "detectron2's DefaultTrainer"
                    if self.training
                    else "predict with fiber_d2.FIBERPredictor and evaluate with "
                    "fiber_d2.engine.FIBERTrainer.build_test_loader's batches, not detectron2's "
                    "DefaultPredictor or DatasetMapper"
                )
            )
        if not self.training:
            return self.inference(batched_inputs)
        if any("instances" not in x for x in batched_inputs):
            raise ValueError(
                "training inputs need 'instances' (gt_boxes, gt_positive_map); for inference "
                "call model.eval() first"
            )
        images = self.preprocess_image(batched_inputs)
        ids, mask = self._stack_text(batched_inputs)
        outputs, anchors = self._run(images.tensor, ids, mask)
        targets = []
        for x in batched_inputs:
            inst = x["instances"].to(self.device)
            boxes = inst.gt_boxes.tensor.clone()
            boxes[:, 2:] -= 1.0  # detectron2 (x2 = x + w) -> legacy (x2 = x + w - 1)
            (positive_map,) = trim_text(ids.shape[1], inst.gt_positive_map)
            targets.append({"gt_boxes": boxes, "positive_map": positive_map})
        losses = self.loss(anchors, outputs, targets, mask)
        # loss_cls is always zero (the unused cls_logits conv stays in the graph for DDP): fold it
        # into another term instead of logging a constant 0 every iteration.
        zero = losses.pop("loss_cls", None)
        if zero is not None:
            losses["loss_centerness"] = losses["loss_centerness"] + zero
        num_empty = sum(int(t["gt_boxes"].shape[0] == 0) for t in targets)
        self.batch_skipped = num_empty == len(targets) or num_empty > self.max_neg_per_batch * len(
            targets
        )
        if self.batch_skipped:
            # FIBER skips such batches: keep the graph, drop the gradient signal; the trainer
            # takes no optimiser step for it (fiber_d2.engine.train_step)
            losses = {k: v * 0.0 for k, v in losses.items()}
        return losses

    @torch.no_grad()
    def inference(self, batched_inputs: list[dict]) -> list[dict]:
        """Detect; inputs with (K, T) text run per prompt chunk and pool the detections."""
        amp = contextlib.nullcontext()
        if self.amp_dtype:
            amp = torch.autocast(self.device.type, dtype=getattr(torch, self.amp_dtype))
        with amp:
            return self._inference(batched_inputs)

    def _inference(self, batched_inputs: list[dict]) -> list[dict]:
        if any(x["input_ids"].dim() == 2 for x in batched_inputs):
            return [self._inference_chunked(x) for x in batched_inputs]
        images = self.preprocess_image(batched_inputs)
        ids, mask = self._stack_text(batched_inputs)
        label_maps = [
            trim_text(ids.shape[1], x["label_token_map"].to(self.device))[0] for x in batched_inputs
        ]
        results = self._detect(images, ids, mask, label_maps)
        return [
            self._postprocess(r, x, s)
            for r, x, s in zip(results, batched_inputs, images.image_sizes)
        ]

    def _detect(self, images: ImageList, ids, mask, label_maps, prefix=None) -> list[Instances]:
        outputs, anchors = self._run(images.tensor, ids, mask, prefix)
        return ground_inference(
            anchors,
            outputs,
            label_maps,
            images.image_sizes,
            mask,
            score_threshold=self.score_threshold,
            pre_nms_top_n=self.pre_nms_top_n,
            nms_threshold=self.nms_threshold,
            detections_per_img=self.detections_per_img,
            score_agg=self.score_agg,
        )

    def _inference_chunked(self, x: dict) -> dict:
        images = self.preprocess_image([x])
        ids_k, mask_k = x["input_ids"].to(self.device), x["attention_mask"].to(self.device)
        maps_k = x["label_token_map"].to(self.device)
        if ids_k.dim() == 1:
            ids_k, mask_k, maps_k = ids_k[None], mask_k[None], maps_k[None]
        parts = self.detect_chunks(images, ids_k, mask_k, maps_k)
        return self._postprocess(Instances.cat(parts), x, images.image_sizes[0])

    def detect_chunks(
        self, images: ImageList, ids_k: torch.Tensor, mask_k: torch.Tensor, maps_k: torch.Tensor
    ) -> list[Instances]:
        """Detections of one image for each of K prompt chunks (not yet post-processed).

        With ``prefix_reuse`` the image prefix runs once, each group of ``chunk_batch_size``
        chunks gets its text prefix from the cache (computed on first use), and only the fused
        top, FPN and head run per group; else the whole model runs once per chunk.

        Args:
            images: one normalised, padded image.
            ids_k, mask_k: (K, T) token ids and attention masks.
            maps_k: (K, L, T) label-token maps.

        Returns:
            K ``Instances`` in the padded input frame, in chunk order.
        """
        if len(images) != 1:
            raise ValueError(f"chunked prompts take one image at a time, got {len(images)}")
        ids_k, mask_k, maps_k = trim_text(self.text_length(mask_k), ids_k, mask_k, maps_k)
        if not self.prefix_reuse:
            return [
                self._detect(images, ids_k[k : k + 1], mask_k[k : k + 1], [maps_k[k]])[0]
                for k in range(ids_k.shape[0])
            ]
        bottom_up = self.backbone.bottom_up
        image_x, image_outputs = bottom_up.forward_image_prefix(images.tensor)
        parts: list[Instances] = []
        for start in range(0, ids_k.shape[0], self.chunk_batch_size):
            ids = ids_k[start : start + self.chunk_batch_size]
            mask = mask_k[start : start + self.chunk_batch_size]
            n = ids.shape[0]
            hidden, layer_mask, text_mask = self._text_prefix(ids, mask)
            prefix = FusionPrefix(
                image=image_x.expand(n, -1, -1, -1),
                text=hidden,
                text_layer_mask=layer_mask,
                attention_mask=text_mask,
                image_outputs={k: v.expand(n, -1, -1, -1) for k, v in image_outputs.items()},
            )
            batch = ImageList(images.tensor.expand(n, -1, -1, -1), images.image_sizes * n)
            maps = list(maps_k[start : start + n])
            parts.extend(self._detect(batch, ids, mask, maps, prefix=prefix))
        return parts

    def _text_prefix(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple:
        """The text prefix of a group of chunks, from the cache or computed and cached."""
        key = (tuple(ids.shape), ids.cpu().numpy().tobytes(), mask.cpu().numpy().tobytes())
        if key not in self._text_prefixes:
            self._text_prefixes[key] = self.backbone.bottom_up.forward_text_prefix(ids, mask)
            if len(self._text_prefixes) > _TEXT_PREFIX_CACHE_SIZE:
                self._text_prefixes.popitem(last=False)
        self._text_prefixes.move_to_end(key)
        return self._text_prefixes[key]

    def _postprocess(self, result: Instances, x: dict, image_size) -> dict:
        height = x.get("height", image_size[0])
        width = x.get("width", image_size[1])
        return {"instances": to_image_frame(result, height, width)}
