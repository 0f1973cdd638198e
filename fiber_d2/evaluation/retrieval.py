"""Image-text retrieval recall (FIBER coarse-grained spec 5.5).

Scores are cosine similarities of the L2-normalised unimodal (ITC) embeddings, no temperature.
TR@K: an image is a hit when any of its captions is among its K best-scored texts. IR@K: a
caption is a hit when its image is among its K best-scored images. The order of equal scores
is UNDETERMINED in the spec; we rank the lower index first (a stable descending sort).
"""

import logging
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import create_small_table

from .integrity import SeenRecords, write_metrics

__all__ = ["RetrievalEvaluator", "retrieval_recall"]

logger = logging.getLogger(__name__)

_CHUNK = 1024  # rows ranked at once (bounds memory at _CHUNK x max(N_img, N_txt))


def _stable_rank(rows: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Rank of one entry per row under a stable descending sort.

    Args:
        rows: (R, N) scores.
        positive: (R,) column of the entry to rank in each row.

    Returns:
        (R,) 0-based ranks: #(strictly larger scores) + #(equal scores at a lower column).
    """
    target = rows.gather(1, positive[:, None])
    columns = torch.arange(rows.shape[1], device=rows.device)
    before = (rows == target) & (columns[None] < positive[:, None])
    return (rows > target).sum(1) + before.sum(1)


def retrieval_recall(
    sim: torch.Tensor,
    text_to_image: torch.Tensor,
    topk: tuple[int, ...] = (1, 5, 10),
    *,
    sim_t2i: torch.Tensor | None = None,
) -> dict[str, float]:
    """Text and image retrieval recall from a similarity matrix.

    Args:
        sim: (N_img, N_txt) scores used to rank texts for every image (TR).
        text_to_image: (N_txt,) index of each caption's image, in [0, N_img).
        topk: the K values.
        sim_t2i: optional (N_img, N_txt) scores used to rank images for every text (IR);
            defaults to ``sim`` (re-ranking may produce a different matrix per direction).

    Returns:
        percent values ``"TR@K"``, ``"IR@K"`` for each K, ``"TR_mean"``, ``"IR_mean"``,
        ``"mean"`` (mean of the two) and ``"RSUM"`` (sum of all TR@K and IR@K).
    """
    if sim.dim() != 2:
        raise ValueError(f"sim must be (N_img, N_txt), got shape {tuple(sim.shape)}")
    n_img, n_txt = sim.shape
    sim_t2i = sim if sim_t2i is None else sim_t2i
    if sim_t2i.shape != sim.shape:
        raise ValueError(f"sim_t2i shape {tuple(sim_t2i.shape)} != sim shape {tuple(sim.shape)}")
    text_to_image = torch.as_tensor(text_to_image, dtype=torch.long, device=sim.device)
    if text_to_image.shape != (n_txt,):
        raise ValueError(
            f"text_to_image must have shape ({n_txt},), got {tuple(text_to_image.shape)}"
        )
    if n_txt and (text_to_image.min() < 0 or text_to_image.max() >= n_img):
        raise ValueError(f"text_to_image values must lie in [0, {n_img})")
    captions_per_image = torch.bincount(text_to_image, minlength=n_img)
    if (captions_per_image == 0).any():
        missing = int(torch.nonzero(captions_per_image == 0)[0])
        raise ValueError(f"image row {missing} has no caption in text_to_image")
    if not topk or min(topk) <= 0:
        raise ValueError(f"topk must be positive integers, got {topk}")
    for name, scores in (("sim", sim), ("sim_t2i", sim_t2i)):
        # a NaN compares false with everything: its pair would rank first, a hit
        bad = int(torch.isnan(scores).sum())
        if bad:
            raise ValueError(
                f"{name} holds {bad} NaN score(s) of {scores.numel()} (non-finite embeddings, e.g. "
                "an fp16 overflow): no recall can be computed"
            )

    # TR: rank every caption inside its own image's row; an image keeps its best caption.
    text_rank = torch.empty(n_txt, dtype=torch.long, device=sim.device)
    for start in range(0, n_txt, _CHUNK):
        cols = torch.arange(start, min(start + _CHUNK, n_txt), device=sim.device)
        text_rank[cols] = _stable_rank(sim[text_to_image[cols]], cols)
    best_text_rank = torch.full((n_img,), n_txt, dtype=torch.long, device=sim.device)
    best_text_rank = best_text_rank.scatter_reduce(0, text_to_image, text_rank, reduce="amin")
    # IR: rank each caption's own image inside the caption's column.
    image_rank = torch.empty(n_txt, dtype=torch.long, device=sim.device)
    for start in range(0, n_txt, _CHUNK):
        cols = torch.arange(start, min(start + _CHUNK, n_txt), device=sim.device)
        image_rank[cols] = _stable_rank(sim_t2i[:, cols].T, text_to_image[cols])

    out = {}
    for k in topk:
        out[f"TR@{k}"] = 100.0 * (best_text_rank < k).float().mean().item()
    for k in topk:
        out[f"IR@{k}"] = 100.0 * (image_rank < k).float().mean().item()
    out["TR_mean"] = sum(out[f"TR@{k}"] for k in topk) / len(topk)
    out["IR_mean"] = sum(out[f"IR@{k}"] for k in topk) / len(topk)
    out["mean"] = (out["TR_mean"] + out["IR_mean"]) / 2
    out["RSUM"] = sum(out[f"TR@{k}"] + out[f"IR@{k}"] for k in topk)
    return out


RerankFn = Callable[[torch.Tensor, int], "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]


class RetrievalEvaluator(DatasetEvaluator):
    """Recall of image-text retrieval over a captions dataset (one record = one image, k captions).

    Rows of the similarity matrix are the images in sorted ``image_id`` order (``self.image_ids``
    after ``evaluate()`` starts); columns are their captions, image after image, each image's
    captions in record order (``self.text_to_image`` maps column -> row).
    """

    @configurable
    def __init__(
        self,
        dataset_name: str,
        *,
        topk: tuple[int, ...] = (1, 5, 10),
        rerank_fn: RerankFn | None = None,
        rerank_k: int = 128,
        distributed: bool = True,
        output_dir: str | None = None,
    ):
        """
        Args:
            dataset_name: the evaluated dataset (used in messages only; the ground truth is the
                pairing of each record's image with its own captions).
            topk: the K of TR@K / IR@K.
            rerank_fn: optional hook ``rerank_fn(sim, k)`` taking the (N_img, N_txt) ITC scores
                and returning re-scored ones: one (N_img, N_txt) tensor, or a pair (scores for
                TR, scores for IR), e.g. ITM logits on each row's / column's top-k and -inf
                elsewhere.
            rerank_k: the k passed to ``rerank_fn``. UNDETERMINED in the spec (the released code
                scores every pair exhaustively); 128 is our choice.
            distributed: gather the embeddings of all ranks before scoring.
            output_dir: optional folder; the metrics are written to ``retrieval_results.json``.
        """
        if not topk or min(topk) <= 0:
            raise ValueError(f"topk must be positive integers, got {topk}")
        self._dataset_name = dataset_name
        self._topk = tuple(int(k) for k in topk)
        self._rerank_fn = rerank_fn
        self._rerank_k = rerank_k
        self._distributed = distributed
        self._output_dir = output_dir
        self.image_ids: list = []
        self.text_to_image = torch.zeros(0, dtype=torch.long)
        self._seen = SeenRecords(dataset_name, type(self).__name__, distributed)
        self.reset()

    @classmethod
    def from_config(cls, cfg, dataset_name: str, output_dir: str | None = None) -> dict:
        return {"dataset_name": dataset_name, "output_dir": output_dir}

    def reset(self):
        self._embeddings = {}  # image_id -> (image (D,), texts (k, D)), float32 on the CPU
        self._seen.reset()

    def process(self, inputs: list[dict], outputs: list[dict]):
        """
        Args:
            inputs: dicts with "image_id" (and optionally "captions", checked against k).
            outputs: dicts with "image_embedding" (D,) and "text_embeddings" (k, D).
        """
        for inp, out in zip(inputs, outputs):
            image_id = inp["image_id"]
            for key in ("image_embedding", "text_embeddings"):
                if key not in out:
                    raise KeyError(f"image {image_id}: model output has no '{key}'")
            image = out["image_embedding"].detach().float().cpu()
            texts = out["text_embeddings"].detach().float().cpu()
            if image.dim() != 1 or texts.dim() != 2 or texts.shape[1] != image.shape[0]:
                raise ValueError(
                    f"image {image_id}: expected image_embedding (D,) and text_embeddings (k, D),"
                    f" got {tuple(image.shape)} and {tuple(texts.shape)}"
                )
            if "captions" in inp and len(inp["captions"]) != texts.shape[0]:
                raise ValueError(
                    f"image {image_id}: {len(inp['captions'])} captions but"
                    f" {texts.shape[0]} text embeddings"
                )
            self._embeddings[image_id] = (image, texts)
            self._seen.add(image_id)

    def evaluate(self) -> OrderedDict:
        """
        Returns:
            ``OrderedDict(retrieval={"TR@K", "IR@K", ..., "RSUM"})`` (percent) on the main
            process, ``{}`` elsewhere.

        Raises:
            EvaluationCoverageError: a record of the dataset not evaluated exactly once.
        """
        self._seen.check()
        if self._distributed:
            comm.synchronize()
            gathered = comm.gather(self._embeddings, dst=0)
            if not comm.is_main_process():
                return OrderedDict()
            embeddings = {}
            for part in gathered:
                embeddings.update(part)
        else:
            embeddings = self._embeddings
        if not embeddings:
            logger.warning("[RetrievalEvaluator] no embedding was processed")
            names = [f"{d}@{k}" for d in ("TR", "IR") for k in self._topk]
            names += ["TR_mean", "IR_mean", "mean", "RSUM"]
            return OrderedDict(retrieval={name: float("nan") for name in names})

        try:
            self.image_ids = sorted(embeddings)
        except TypeError:  # mixed id types
            self.image_ids = sorted(embeddings, key=str)
        images = torch.stack([embeddings[i][0] for i in self.image_ids])
        texts = torch.cat([embeddings[i][1] for i in self.image_ids])
        self.text_to_image = torch.cat(
            [torch.full((len(embeddings[i][1]),), row) for row, i in enumerate(self.image_ids)]
        )
        sim = F.normalize(images, dim=-1) @ F.normalize(texts, dim=-1).T
        sim_t2i = None
        if self._rerank_fn is not None:
            reranked = self._rerank_fn(sim, self._rerank_k)
            if isinstance(reranked, tuple):
                sim, sim_t2i = reranked
            else:
                sim = reranked
        metrics = retrieval_recall(sim, self.text_to_image, self._topk, sim_t2i=sim_t2i)
        logger.info(
            "Retrieval on '%s' (%d images, %d texts):\n%s",
            self._dataset_name,
            len(self.image_ids),
            len(texts),
            create_small_table(metrics),
        )
        output = OrderedDict(retrieval=metrics)
        return write_metrics(output, self._output_dir, "retrieval_results.json")
