"""ITC-then-ITM retrieval scoring: re-rank the top-k ITC pairs of every image and every text with ITM.

Coarse spec §5.5: the ITM model's score is the raw "match" logit (``itm_score.fc`` row 1) of the fused
model. The released code scores every image-text pair; fiber_d2 scores every pair with ITC (cosine of the
unimodal embeddings) and re-scores only the ``k`` best texts of each image (text retrieval, TR) and the
``k`` best images of each text (image retrieval, IR) with ITM. ``k`` is UNDETERMINED in the spec
(``RETRIEVAL.RERANK_K``). Recall@K for K <= k depends only on the re-ranked entries.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import torch
from detectron2.evaluation.evaluator import inference_context
from torch import nn

from fiber_d2.engine.train_step import unwrap_model

__all__ = ["ITMPairScorer", "stable_topk", "topk_rerank"]

logger = logging.getLogger(__name__)

_SORT_CHUNK = 256  # rows sorted at once (bounds memory at _SORT_CHUNK x N)

PairScorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def stable_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Column indices of the ``k`` best entries of each row, best first, equal scores lower index first.

    This is the tie order of :func:`fiber_d2.evaluation.retrieval_recall`, so the re-ranked set is the
    set the ITC ranking puts first.

    Args:
        scores: (R, N) scores.
        k: entries kept per row, 1 <= k <= N.

    Returns:
        (R, k) long indices.
    """
    out = []
    for start in range(0, scores.shape[0], _SORT_CHUNK):
        chunk = scores[start : start + _SORT_CHUNK]
        out.append(torch.sort(chunk, dim=1, descending=True, stable=True).indices[:, :k])
    if not out:
        return torch.zeros(0, k, dtype=torch.long, device=scores.device)
    return torch.cat(out)


def topk_rerank(
    sim: torch.Tensor, k: int, score_pairs: PairScorer
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-score the top-k texts of each image and the top-k images of each text.

    Every pair in either top-k set is scored once by ``score_pairs``. In the returned matrices the
    re-scored entries hold their new score and every other entry holds its ITC score shifted below all
    new scores, so within each row (TR) / column (IR) the top-k keep their place as the best k, are
    ordered by the new score, and the rest keep their ITC order.

    Args:
        sim: (N_img, N_txt) ITC scores.
        k: pairs re-scored per image and per text (clamped to N_txt / N_img).
        score_pairs: ``score_pairs(image_index (P,), text_index (P,)) -> (P,)`` scores of the pairs
            (higher = better match), e.g. :class:`ITMPairScorer`.

    Returns:
        ``(sim_tr, sim_ir)``, each (N_img, N_txt): ``sim_tr`` ranks texts per image (rows), ``sim_ir``
        ranks images per text (columns).
    """
    if sim.dim() != 2 or 0 in sim.shape:
        raise ValueError(f"sim must be a non-empty (N_img, N_txt) matrix, got {tuple(sim.shape)}")
    if k < 1:
        raise ValueError(f"re-ranking k must be >= 1, got {k}")
    n_img, n_txt = sim.shape
    sim = sim.float()
    tr_cols = stable_topk(sim, min(k, n_txt))  # (N_img, k_tr): texts of each image
    ir_rows = stable_topk(sim.T, min(k, n_img))  # (N_txt, k_ir): images of each text
    tr_img = torch.arange(n_img, device=sim.device)[:, None].expand_as(tr_cols).reshape(-1)
    tr_txt = tr_cols.reshape(-1)
    ir_img = ir_rows.reshape(-1)
    ir_txt = torch.arange(n_txt, device=sim.device)[:, None].expand_as(ir_rows).reshape(-1)
    flat = torch.cat([tr_img * n_txt + tr_txt, ir_img * n_txt + ir_txt])
    pairs, inverse = torch.unique(flat, return_inverse=True)
    logger.info(
        "Re-ranking the top %d pairs of %d images and %d texts: %d distinct pairs to score",
        k,
        n_img,
        n_txt,
        len(pairs),
    )
    scores = score_pairs(pairs // n_txt, pairs % n_txt)
    scores = torch.as_tensor(scores).to(device=sim.device, dtype=torch.float32).reshape(-1)
    if scores.shape[0] != len(pairs):
        raise ValueError(f"score_pairs returned {scores.shape[0]} scores for {len(pairs)} pairs")
    if not torch.isfinite(scores).all():
        raise ValueError("score_pairs returned non-finite scores")
    # Everything not re-scored sits strictly below every new score, in ITC order.
    base = sim + (scores.min() - sim.max() - 1.0)
    n_tr = tr_img.shape[0]
    sim_tr = base.clone()
    sim_tr[tr_img, tr_txt] = scores[inverse[:n_tr]]
    sim_ir = base
    sim_ir[ir_img, ir_txt] = scores[inverse[n_tr:]]
    return sim_tr, sim_ir


class ITMPairScorer:
    """Scores image-text pairs with a coarse model's ITM head (column 1, "match", of ``itm_logits``).

    The model is switched to eval mode for the call and restored afterwards (evaluators run after
    detectron2's inference context has ended). On CUDA the fused passes run under autocast, as the
    original retrieval evaluation does (coarse spec §4).
    """

    def __init__(
        self,
        model: nn.Module,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        batch_size: int = 64,
    ):
        """
        Args:
            model: a ``FIBERCoarse`` (or subclass, possibly DDP-wrapped) with ``itm_logits``,
                ``pixel_mean`` and ``pixel_std``.
            images: (N_img, 3, S, S) mapper images (uint8, ``INPUT.FORMAT``), on any device.
            input_ids, attention_mask: (N_txt, T) tokenised texts.
            batch_size: pairs per fused forward.
        """
        if images.dim() != 4:
            raise ValueError(f"images must be (N_img, 3, S, S), got {tuple(images.shape)}")
        if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} and attention_mask"
                f" {tuple(attention_mask.shape)} must be the same (N_txt, T) shape"
            )
        if batch_size < 1:
            raise ValueError(f"ITM batch size must be >= 1, got {batch_size}")
        self.model = unwrap_model(model)
        self.images = images
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, image_index: torch.Tensor, text_index: torch.Tensor) -> torch.Tensor:
        """
        Args:
            image_index, text_index: (P,) long indices into the stored images / texts.

        Returns:
            (P,) float32 match logits on the CPU.
        """
        if image_index.shape != text_index.shape:
            raise ValueError(
                f"image_index {tuple(image_index.shape)} and text_index"
                f" {tuple(text_index.shape)} must have the same shape"
            )
        model = self.model
        device = model.pixel_mean.device
        amp = (
            torch.autocast("cuda", dtype=torch.float16)
            if device.type == "cuda"
            else contextlib.nullcontext()
        )
        out = []
        image_index, text_index = image_index.cpu(), text_index.cpu()
        with inference_context(model), amp:
            for start in range(0, len(image_index), self.batch_size):
                i = image_index[start : start + self.batch_size]
                t = text_index[start : start + self.batch_size]
                images = self.images[i.to(self.images.device)].to(device).float()
                images = (images - model.pixel_mean) / model.pixel_std
                ids = self.input_ids[t.to(self.input_ids.device)].to(device)
                mask = self.attention_mask[t.to(self.attention_mask.device)].to(device)
                out.append(model.itm_logits(images, ids, mask)[:, 1].float().cpu())
        if not out:
            return torch.zeros(0)
        return torch.cat(out)
