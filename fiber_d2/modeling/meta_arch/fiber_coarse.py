"""``FIBERCoarse``: coarse-grained pre-training (ITC + ITM with hard negatives + MLM) on image-text pairs.

It shares the fused backbone with the detector (``backbone`` here is the bottom-up ``FusedSwinRoberta``,
so a coarse checkpoint's ``backbone.*`` tensors land in the detector's ``backbone.bottom_up.*``).
Spec: coarse_grained.md §1.6-1.7 (unimodal and fused paths), §2 (poolers and heads), §3 (objectives).

Batched inputs (from ``CaptionDatasetMapper``): ``image`` uint8 (3, S, S); ``input_ids``/``attention_mask``
(T,) for training (one caption) or (k, T) at evaluation (all captions of the image); ``mlm_input_ids`` and
``mlm_labels`` (T,) for MLM.

Hard negatives for ITM (§3.4, ``MODEL.COARSE.ITM_NEGATIVES``): "queue", the original's, draws them with
the ITC logits' softmax from this process's batch followed by the queued samples, whose inputs the queue
keeps beside their embeddings (uint8 images: 1.8 GB per process at 384 px instead of the original's
7.25 GB of float32); "batch" draws them from the current batch gathered over all ranks, without that
memory.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.utils import comm
from torch import nn

from ...config import ConfigError
from ...text import padded_text_length, trim_text
from ..backbone.fused import FusedSwinRoberta, FusionPrefix
from .coarse_heads import ITMHead, MLMHead, Pooler, init_head
from .coarse_losses import FeatureQueue, itc_logits, itc_loss, mlm_loss, sample_hard_negatives

__all__ = ["COARSE_LOSSES", "FIBERCoarse", "ITM_NEGATIVE_SOURCES", "QUEUE_INITS", "check_losses"]

COARSE_LOSSES = ("itc", "itm", "mlm")  # the objectives MODEL.COARSE.LOSSES may name
QUEUE_INITS = ("random", "empty")  # MODEL.COARSE.QUEUE_INIT
ITM_NEGATIVE_SOURCES = ("queue", "batch")  # MODEL.COARSE.ITM_NEGATIVES


def check_losses(losses, loss_weights=None) -> None:
    """``MODEL.COARSE.LOSSES`` names known objectives and, when ``loss_weights`` is given,
    ``MODEL.COARSE.LOSS_WEIGHTS`` has one weight per objective.

    Raises:
        ConfigError: one line naming the key.
    """
    unknown = sorted(set(losses) - set(COARSE_LOSSES))
    if unknown:
        raise ConfigError(
            f"MODEL.COARSE.LOSSES has unknown objectives {unknown}; known: {', '.join(COARSE_LOSSES)}"
        )
    if loss_weights is not None and len(loss_weights) != len(losses):
        raise ConfigError(
            f"MODEL.COARSE.LOSS_WEIGHTS {list(loss_weights)} must give one weight per "
            f"MODEL.COARSE.LOSSES entry {list(losses)}"
        )


logger = logging.getLogger(__name__)


def _gather_cat(x: torch.Tensor) -> torch.Tensor:
    """All-gather (no gradient) along dim 0 across ranks; identity in a single process."""
    if comm.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(comm.get_world_size())]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


@META_ARCH_REGISTRY.register()
class FIBERCoarse(nn.Module):
    """Coarse-grained FIBER (see module docstring)."""

    # DistributedDataParallel options for multi-process runs (fiber_d2.engine.trainer.fiber_ddp):
    # * find_unused_parameters: the model carries every head and branch of the released layouts,
    #   but which of them train depends on MODEL.COARSE.LOSSES and the task (VQA, NLVR2 and
    #   captioning never use the ITC branch, ITC retrieval not the fused one); without it DDP stops
    #   in the second step.
    # * broadcast_buffers: every rank uses rank 0's buffers, the ones its checkpoints save, so the
    #   evaluation at the end of training reads the running statistics of
    #   MODEL.COARSE.CLS_BATCH_NORM that an --eval-only run of model_final.pth reads (the ITC
    #   queues are equal on all ranks anyway).
    ddp_kwargs = {"find_unused_parameters": True, "broadcast_buffers": True}
    # ITM with hard negatives (§3.4); a subclass training ITM otherwise (random negatives) sets False,
    # and keeps no raw-input queue
    HARD_NEGATIVE_ITM = True

    @configurable
    def __init__(
        self,
        *,
        backbone: FusedSwinRoberta,
        image_dim: int,
        text_dim: int,
        vocab_size: int,
        queue_size: int,
        temperature: float,
        losses: list[str],
        loss_weights: dict[str, float],
        pixel_mean: list[float],
        pixel_std: list[float],
        pad_to_max_query_len: bool = False,
        itc_text_pool: str = "first",
        queue_init: str = "random",
        itc_batch_norm: bool = False,
        share_prefix: bool = False,
        itm_negatives: str = "queue",
        image_size: int = 384,
        max_query_len: int = 40,
        pad_token_id: int = 1,
    ):
        """
        Args:
            backbone: the fused image/text towers.
            image_dim: width of the last image stage (Swin-B: 1024); text_dim: text width (768).
            vocab_size: MLM output vocabulary.
            queue_size: ITC feature-queue length Q.
            temperature: initial learnable ITC temperature (clamped to [0.001, 1]).
            losses: enabled objectives among "itc", "itm", "mlm".
            loss_weights: weight per objective.
            pixel_mean, pixel_std: input normalisation.
            pad_to_max_query_len: run text at its tokenized length T; False cuts each batch to
                :func:`fiber_d2.text.padded_text_length` (the longest over all ranks in training).
            itc_text_pool: "first" (the ``<s>`` token, the original) or "mean" (masked token mean)
                for the unimodal ITC text embedding.
            queue_init: "random" (``randn`` columns, the original) or "empty" (ITC uses only the
                queue columns already filled with enqueued embeddings).
            itc_batch_norm: standardise each ITC embedding dimension over the batch (running
                statistics at inference; no affine parameters) before the L2 normalisation.
            share_prefix: in training, compute the image prefix (the blocks below the first fused
                one) once per step for the ITC, MLM and ITM passes, and the text prefix of the
                captions once for ITC and ITM, instead of once per pass as the original does. The
                losses and gradients are the same up to rounding when the prefix has no randomness;
                with stochastic depth or dropout there, the passes share one sample of it (the
                original draws one per pass). ITM's pairs take the batch images' rows of the
                shared image prefix (queued negatives' images and the pairs' texts run their own);
                with ``itm_negatives`` "batch", on one process, they are rows of both prefixes.
            itm_negatives: where ITM's hard negatives come from: "queue" (the original: this
                process's batch, then the queued samples, whose inputs the queue keeps) or "batch"
                (the batch gathered over all ranks; no input queue).
            image_size, max_query_len, pad_token_id: the input queue's image size S, text length
                T and pad id (``itm_negatives`` "queue").
        """
        super().__init__()
        check_losses(losses)
        self.backbone = backbone
        self.losses = list(losses)
        self.loss_weights = dict(loss_weights)
        self.pad_to_max_query_len = pad_to_max_query_len
        self.share_prefix = share_prefix
        # the original vit_model.norm (unimodal path only)
        self.image_norm = nn.LayerNorm(image_dim)
        self.cross_modal_text_transform = nn.Linear(text_dim, text_dim)
        self.cross_modal_image_transform = nn.Linear(image_dim, text_dim)
        self.cross_modal_text_pooler = Pooler(text_dim, "first")
        self.cross_modal_image_pooler = Pooler(text_dim, "mean")
        self.cross_modal_text_transform_itc = nn.Linear(text_dim, text_dim)
        self.cross_modal_image_transform_itc = nn.Linear(image_dim, text_dim)
        self.cross_modal_text_pooler_itc = Pooler(text_dim, itc_text_pool)
        self.cross_modal_image_pooler_itc = Pooler(text_dim, "mean")
        if queue_init not in QUEUE_INITS:
            raise ConfigError(
                f"MODEL.COARSE.QUEUE_INIT must be one of {QUEUE_INITS}, got {queue_init!r}"
            )
        self.queue_init = queue_init
        if itm_negatives not in ITM_NEGATIVE_SOURCES:
            raise ConfigError(
                f"MODEL.COARSE.ITM_NEGATIVES must be one of {ITM_NEGATIVE_SOURCES}, "
                f"got {itm_negatives!r}"
            )
        self._build_heads(
            image_dim=image_dim,
            text_dim=text_dim,
            vocab_size=vocab_size,
            queue_size=queue_size,
            temperature=temperature,
            itc_batch_norm=itc_batch_norm,
        )
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self._init_new_modules()
        if itm_negatives == "queue" and self.HARD_NEGATIVE_ITM and "itm" in self.losses:
            self.queue.hold_inputs(image_size, max_query_len, pad_token_id)
            # equal on every rank (each enqueues the gathered batch): not broadcast by DDP
            self._ddp_params_and_buffers_to_ignore = [
                f"queue.{name}" for name in FeatureQueue.INPUT_BUFFERS
            ]

    def _build_heads(
        self,
        *,
        image_dim: int,
        text_dim: int,
        vocab_size: int,
        queue_size: int,
        temperature: float,
        itc_batch_norm: bool,
    ) -> None:
        """Builds what follows the shared transforms and poolers: here the pre-training heads
        (``itm_score``, ``mlm_score``, ``temp``, the ITC batch norms and queue). A subclass with
        other heads overrides it; all of them then get :meth:`_init_new_modules` (the random draws
        follow the order in which modules are built here)."""
        self.itm_score = ITMHead(2 * text_dim)
        self.mlm_score = MLMHead(text_dim, vocab_size)
        self.temp = nn.Parameter(torch.tensor(float(temperature)))
        self.itc_image_bn = nn.BatchNorm1d(text_dim, affine=False) if itc_batch_norm else None
        self.itc_text_bn = nn.BatchNorm1d(text_dim, affine=False) if itc_batch_norm else None
        self.queue = FeatureQueue(text_dim, queue_size)

    def heads_not_read(self) -> tuple[str, ...]:
        """Names (``"prefix."`` or a parameter's full name) of the pre-training heads that none of
        ``losses`` reads. The original builds ``mlm_score``, ``itm_score`` and ``temp`` for its
        losses only, so its task checkpoints lack the others (ITC retrieval: ``itm_score`` and
        ``mlm_score``); :class:`~fiber_d2.checkpoint.checkpointer.FIBERCheckpointer` counts a file
        without one of them, as a whole, as a complete load."""
        reads = {"mlm": "mlm_score.", "itm": "itm_score.", "itc": "temp"}
        return tuple(head for loss, head in reads.items() if loss not in self.losses)

    def _init_new_modules(self):
        for name, child in self.named_children():
            if name != "backbone":
                init_head(child)

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.COARSE
        check_losses(c.LOSSES, c.LOSS_WEIGHTS)
        weights = dict(zip(c.LOSSES, c.LOSS_WEIGHTS))
        return {
            "backbone": FusedSwinRoberta(cfg),
            "image_dim": cfg.MODEL.SWIN.EMBED_DIM * 2 ** (len(cfg.MODEL.SWIN.DEPTHS) - 1),
            "text_dim": cfg.MODEL.LANGUAGE_BACKBONE.HIDDEN_SIZE,
            "vocab_size": cfg.MODEL.LANGUAGE_BACKBONE.VOCAB_SIZE,
            "queue_size": c.QUEUE_SIZE,
            "temperature": c.TEMPERATURE,
            "losses": list(c.LOSSES),
            "loss_weights": weights,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "pad_to_max_query_len": cfg.INPUT.PAD_TO_MAX_QUERY_LEN,
            "itc_text_pool": c.ITC_TEXT_POOL,
            "queue_init": c.QUEUE_INIT,
            "itc_batch_norm": c.ITC_BATCH_NORM,
            "share_prefix": c.SHARE_PREFIX,
            "itm_negatives": c.ITM_NEGATIVES,
            "image_size": cfg.INPUT.IMAGE_SIZE,
            "max_query_len": cfg.MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN,
            "pad_token_id": cfg.MODEL.LANGUAGE_BACKBONE.PAD_TOKEN_ID,
        }

    def _text_length(self, mask: torch.Tensor, all_ranks: bool = False) -> int:
        """Token length a batch runs at; ``all_ranks``: the longest over ranks (ITM gathers)."""
        length = padded_text_length(mask, self.pad_to_max_query_len)
        if all_ranks and comm.get_world_size() > 1:
            t = torch.tensor([length], device=mask.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            length = int(t.item())
        return length

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    # ------------------------------------------------------------------ encoders
    def _raw_images(self, batched_inputs: list[dict]) -> torch.Tensor:
        """The records' images as the mapper gives them, stacked: (B, 3, S, S) on the device."""
        sizes = {tuple(x["image"].shape) for x in batched_inputs}
        if len(sizes) != 1:
            raise ValueError(f"images must share one size (INPUT.IMAGE_SIZE), got {sizes}")
        return torch.stack([x["image"] for x in batched_inputs]).to(self.device)

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Mapper images (B, 3, S, S) -> normalised float images."""
        return (images.float() - self.pixel_mean) / self.pixel_std

    def _images(self, batched_inputs: list[dict]) -> torch.Tensor:
        return self._normalize(self._raw_images(batched_inputs))

    @staticmethod
    def _tokens(image_features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Last image stage (B, C, h, w) -> tokens (B, h*w, C)."""
        last = image_features[sorted(image_features)[-1]]
        return last.flatten(2).transpose(1, 2)

    def encode_image(
        self, images: torch.Tensor, prefix: FusionPrefix | None = None
    ) -> torch.Tensor:
        """Un-fused image embedding: (B, 3, S, S) -> L2-normalised (B, D); ``prefix``: these
        images' :meth:`~FusedSwinRoberta.forward_prefix`, computed earlier."""
        if prefix is None:
            features = self.backbone.forward_image(images)
        else:
            features = self.backbone.forward_image_from_prefix(prefix.image, prefix.image_outputs)
        tokens = self.image_norm(self._tokens(features))
        pooled = self.cross_modal_image_pooler_itc(self.cross_modal_image_transform_itc(tokens))
        if self.itc_image_bn is not None:
            pooled = self.itc_image_bn(pooled)
        return F.normalize(pooled, dim=-1)

    def encode_text(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prefix: FusionPrefix | None = None,
    ) -> torch.Tensor:
        """Un-fused text embedding: (B, T) ids and mask -> L2-normalised (B, D); ``prefix``: these
        texts' :meth:`~FusedSwinRoberta.forward_prefix`, computed earlier."""
        if prefix is None:
            hidden = self.backbone.forward_text(input_ids, attention_mask)["hidden"]
        else:
            hidden = self.backbone.forward_text_from_prefix(
                prefix.text, prefix.text_layer_mask, prefix.attention_mask
            )["hidden"]
        pooled = self.cross_modal_text_pooler_itc(
            self.cross_modal_text_transform_itc(hidden), attention_mask
        )
        if self.itc_text_bn is not None:
            pooled = self.itc_text_bn(pooled)
        return F.normalize(pooled, dim=-1)

    def fused(
        self, images, input_ids, attention_mask, prefix: FusionPrefix | None = None
    ) -> dict[str, torch.Tensor]:
        """Fused forward. Returns ``text_feats`` (B, T, D), ``image_feats`` (B, N, D), ``cls_feats``
        (B, 2D) = [text pooled ; image pooled]. With ``prefix`` (the inputs'
        :meth:`~FusedSwinRoberta.forward_prefix`, computed earlier) only the fused top runs, and
        the other arguments are not read."""
        if prefix is None:
            image_features, text = self.backbone(images, input_ids, attention_mask, fuse=True)
        else:
            image_features, text = self.backbone.forward_fused(prefix)
        return self.fused_heads(text["hidden"], self._tokens(image_features))

    def fused_heads(
        self, text_hidden: torch.Tensor, image_tokens: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """What follows the fused backbone in :meth:`fused`: the cross-modal transforms and poolers
        on (B, T, Dt) fused text states and (B, N, C) last-stage image tokens; same outputs."""
        text_feats = self.cross_modal_text_transform(text_hidden)
        image_feats = self.cross_modal_image_transform(image_tokens)
        cls_feats = torch.cat(
            [self.cross_modal_text_pooler(text_feats), self.cross_modal_image_pooler(image_feats)],
            dim=-1,
        )
        return {"text_feats": text_feats, "image_feats": image_feats, "cls_feats": cls_feats}

    def itm_logits(self, images, input_ids, attention_mask) -> torch.Tensor:
        """(B, 2) match logits of image-text pairs; column 1 is "match" (the retrieval score)."""
        return self.itm_score(self.fused(images, input_ids, attention_mask)["cls_feats"])

    # ------------------------------------------------------------------ forward
    def forward(self, batched_inputs: list[dict]):
        """Training: dict of weighted losses ``loss_itc``, ``loss_itm``, ``loss_mlm``.
        Inference: per record ``{"image_embedding": (D,), "text_embeddings": (k, D)}``."""
        if not self.training:
            return self.inference(batched_inputs)
        raw = self._raw_images(batched_inputs)
        images = self._normalize(raw)
        ids = torch.stack([x["input_ids"] for x in batched_inputs]).to(self.device)
        mask = torch.stack([x["attention_mask"] for x in batched_inputs]).to(self.device)
        length = self._text_length(mask, all_ranks=True)
        ids, mask = trim_text(length, ids, mask)
        inputs = (raw, ids, mask) if self.queue_holds_inputs else None
        losses = {}
        # the image prefix and the captions' text prefix, once for every pass (share_prefix;
        # MLM alone runs one pass, so there is nothing to share)
        share = self.share_prefix and ("itc" in self.losses or "itm" in self.losses)
        shared = self.backbone.forward_prefix(images, ids, mask) if share else None
        if "mlm" in self.losses:
            mlm_ids = torch.stack([x["mlm_input_ids"] for x in batched_inputs]).to(self.device)
            labels = torch.stack([x["mlm_labels"] for x in batched_inputs]).to(self.device)
            mlm_ids, labels = trim_text(length, mlm_ids, labels)
            mlm_prefix = None
            if shared is not None:
                hidden, layer_mask, text_mask = self.backbone.forward_text_prefix(mlm_ids, mask)
                mlm_prefix = dataclasses.replace(
                    shared, text=hidden, text_layer_mask=layer_mask, attention_mask=text_mask
                )
            logits = self.mlm_score(self.fused(images, mlm_ids, mask, mlm_prefix)["text_feats"])
            losses["loss_mlm"] = mlm_loss(logits, labels) * self.loss_weights["mlm"]
        if "itc" in self.losses or "itm" in self.losses:
            with torch.no_grad():
                self.temp.clamp_(0.001, 1.0)
            f_i, f_t = self.encode_image(images, shared), self.encode_text(ids, mask, shared)
            q = self.queue
            image_queue, text_queue = q.image_queue, q.text_queue
            if self.queue_init == "empty":  # only the columns written so far
                filled = q.filled
                image_queue, text_queue = image_queue[:, :filled], text_queue[:, :filled]
            sim_i2t, sim_t2i = itc_logits(f_i, f_t, image_queue, text_queue, self.temp)
            if "itc" in self.losses:
                losses["loss_itc"] = itc_loss(sim_i2t, sim_t2i) * self.loss_weights["itc"]
            if "itm" in self.losses:
                if inputs is not None:
                    loss = self._queue_itm_loss(*inputs, sim_i2t, sim_t2i, shared)
                else:
                    loss = self._itm_loss(images, ids, mask, f_i, f_t, shared)
                losses["loss_itm"] = loss * self.loss_weights["itm"]
            with torch.no_grad():
                gathered = None if inputs is None else tuple(_gather_cat(x) for x in inputs)
                q.enqueue(_gather_cat(f_i.detach()), _gather_cat(f_t.detach()), gathered)
        return losses

    @property
    def queue_holds_inputs(self) -> bool:
        """ITM's hard negatives come from the queue (``itm_negatives`` "queue")."""
        queue = getattr(self, "queue", None)
        return queue is not None and queue.holds_inputs

    @torch.no_grad()
    def itm_queue_rows(
        self, sim_i2t: torch.Tensor, sim_t2i: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """B positives, B (image, hard-negative text) and B (hard-negative image, text) pairs, as
        rows of the pool [this process's B samples ; the queued samples] (§3.4).

        The negatives are drawn with softmax over the ITC logits' columns of that pool (the
        queue's first ``filled`` slots, the only ones holding inputs); a sample's own pair is never
        drawn. The queued samples are those of earlier passes on every rank: this pass's are
        enqueued after.

        Args:
            sim_i2t, sim_t2i: (B, B + Q') logits of :func:`itc_logits` against this queue.

        Returns:
            image rows (3B,), text rows (3B,), labels (3B,) with 1 for the positives.
        """
        b = sim_i2t.shape[0]
        n = b + self.queue.filled
        positive = torch.arange(b, device=sim_i2t.device)
        neg_text = sample_hard_negatives(sim_i2t[:, :n], positive)
        neg_image = sample_hard_negatives(sim_t2i[:, :n], positive)
        image_rows = torch.cat([positive, positive, neg_image])
        text_rows = torch.cat([positive, neg_text, positive])
        labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(sim_i2t.device)
        return image_rows, text_rows, labels

    @torch.no_grad()
    def itm_queue_pairs(
        self,
        images: torch.Tensor,
        ids: torch.Tensor,
        mask: torch.Tensor,
        sim_i2t: torch.Tensor,
        sim_t2i: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The pairs of :meth:`itm_queue_rows` as inputs.

        Args:
            images: (B, 3, S, S) uint8 mapper images; ids, mask: (B, T') their captions.
            sim_i2t, sim_t2i: (B, B + Q') logits of :func:`itc_logits` against this queue.

        Returns:
            images (3B, 3, S, S) uint8, ids and mask (3B, T), labels (3B,) with 1 for the positives.
        """
        image_rows, text_rows, labels = self.itm_queue_rows(sim_i2t, sim_t2i)
        return (*self.queue.take_inputs(image_rows, text_rows, images, ids, mask), labels)

    def _queue_itm_loss(self, images, ids, mask, sim_i2t, sim_t2i, shared=None) -> torch.Tensor:
        """ITM cross-entropy over the pairs of :meth:`itm_queue_rows`. With ``shared`` (this
        batch's :meth:`~FusedSwinRoberta.forward_prefix`) the batch images' prefixes are its rows
        and only the queued images' prefixes run here; the pairs' texts run their prefix here."""
        image_rows, text_rows, labels = self.itm_queue_rows(sim_i2t, sim_t2i)
        pairs = self.queue.take_inputs(image_rows, text_rows, images, ids, mask)
        pair_images, pair_ids, pair_mask = self._pair_inputs(*pairs)
        if shared is None:
            logits = self.itm_logits(pair_images, pair_ids, pair_mask)
        else:
            prefix = self._pair_prefix(shared, image_rows, pair_images, pair_ids, pair_mask)
            logits = self.itm_score(self.fused(None, None, None, prefix)["cls_feats"])
        return F.cross_entropy(logits, labels)

    def _pair_prefix(
        self,
        shared: FusionPrefix,
        image_rows: torch.Tensor,
        images: torch.Tensor,
        ids: torch.Tensor,
        mask: torch.Tensor,
    ) -> FusionPrefix:
        """The pairs' prefix: rows of ``shared`` for images of this batch (``image_rows`` < B), the
        image prefix of the queued ones (rows of ``images``, (P, 3, S, S) normalised), and the text
        prefix of the (P, T) pair texts."""
        b = shared.image.shape[0]
        rows = image_rows.clamp(max=b - 1)
        x = shared.image[rows]
        outputs = {k: v[rows] for k, v in shared.image_outputs.items()}
        queued = (image_rows >= b).nonzero().flatten()
        if len(queued):
            queued_x, queued_outputs = self.backbone.forward_image_prefix(images[queued])
            x = x.index_copy(0, queued, queued_x)
            outputs = {k: v.index_copy(0, queued, queued_outputs[k]) for k, v in outputs.items()}
        hidden, layer_mask, text_mask = self.backbone.forward_text_prefix(ids, mask)
        return FusionPrefix(
            image=x,
            text=hidden,
            text_layer_mask=layer_mask,
            attention_mask=text_mask,
            image_outputs=outputs,
        )

    def _pair_inputs(self, images, ids, mask):
        """Pairs of :meth:`itm_queue_pairs` as model inputs: normalised images, texts cut to their
        padded length."""
        return (self._normalize(images), *trim_text(self._text_length(mask), ids, mask))

    def _itm_loss(self, images, ids, mask, f_i, f_t, prefix=None) -> torch.Tensor:
        """ITM cross-entropy over the pairs of :meth:`itm_pairs`; with ``prefix`` (these inputs'
        :meth:`~FusedSwinRoberta.forward_prefix`) on one process, the pairs' prefixes are its rows.
        """
        if prefix is not None and comm.get_world_size() == 1:
            image_rows, text_rows, labels = self.itm_pair_rows(f_i, f_t)
            cls_feats = self.fused(None, None, None, prefix.select(image_rows, text_rows))
            return F.cross_entropy(self.itm_score(cls_feats["cls_feats"]), labels)
        pair_images, pair_ids, pair_mask, labels = self.itm_pairs(images, ids, mask, f_i, f_t)
        return F.cross_entropy(self.itm_logits(pair_images, pair_ids, pair_mask), labels)

    @torch.no_grad()
    def itm_pair_rows(
        self, f_i: torch.Tensor, f_t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """B positives, B (image, hard-negative text) and B (hard-negative image, text) pairs, as
        rows of the batch gathered over all ranks.

        Negatives are drawn with softmax(ITC similarity) weights; a sample's own pair is never
        drawn.

        Args:
            f_i, f_t: (B, D) this rank's ITC image and text embeddings.

        Returns:
            image rows (3B,), text rows (3B,), labels (3B,) with 1 for the positives.
        """
        b = f_i.shape[0]
        all_f_i, all_f_t = _gather_cat(f_i.detach()), _gather_cat(f_t.detach())
        positive = torch.arange(b, device=f_i.device) + comm.get_rank() * b
        temp = self.temp.detach()
        neg_text = sample_hard_negatives(f_i.detach() @ all_f_t.t() / temp, positive)
        neg_image = sample_hard_negatives(f_t.detach() @ all_f_i.t() / temp, positive)
        image_rows = torch.cat([positive, positive, neg_image])
        text_rows = torch.cat([positive, neg_text, positive])
        labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(f_i.device)
        return image_rows, text_rows, labels

    @torch.no_grad()
    def itm_pairs(self, images, ids, mask, f_i, f_t):
        """The pairs of :meth:`itm_pair_rows` as inputs.

        Returns:
            images (3B, 3, S, S), ids (3B, T), mask (3B, T), labels (3B,) with 1 for the positives.
        """
        image_rows, text_rows, labels = self.itm_pair_rows(f_i, f_t)
        all_images, all_ids, all_mask = _gather_cat(images), _gather_cat(ids), _gather_cat(mask)
        return all_images[image_rows], all_ids[text_rows], all_mask[text_rows], labels

    @torch.no_grad()
    def inference(self, batched_inputs: list[dict]) -> list[dict]:
        images = self._images(batched_inputs)
        f_i = self.encode_image(images)
        results = []
        for k, x in enumerate(batched_inputs):
            ids, mask = x["input_ids"].to(self.device), x["attention_mask"].to(self.device)
            if ids.dim() == 1:
                ids, mask = ids[None], mask[None]
            ids, mask = trim_text(self._text_length(mask), ids, mask)
            results.append(
                {"image_embedding": f_i[k], "text_embeddings": self.encode_text(ids, mask)}
            )
        return results
