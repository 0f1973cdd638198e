"""``ITMRerankRetrievalEvaluator``: fiber_d2's retrieval recall with ITM re-ranking of the ITC top-k.

It subclasses :class:`fiber_d2.evaluation.RetrievalEvaluator` and only adds what the ``rerank_fn`` hook
needs: the mapped images and token ids of every record, and the model to score pairs with
(:class:`~.rerank.ITMPairScorer`). The ITC embeddings, the gathering across ranks, the scoring order and the
recall computation are the base class's.
"""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict

import torch
from detectron2.config import configurable
from detectron2.utils import comm
from torch import nn

from fiber_d2.evaluation import EvaluationCoverageError, RetrievalEvaluator

from .rerank import ITMPairScorer, topk_rerank

__all__ = ["ITMRerankRetrievalEvaluator"]

logger = logging.getLogger(__name__)


class ITMRerankRetrievalEvaluator(RetrievalEvaluator):
    """TR/IR recall where each image's and each text's top-k ITC pairs are re-scored by ITM.

    The main process gathers the ITC embeddings and chooses the pairs to re-score. In a multi-process
    run every rank then scores the pairs of the images it mapped: the images stay where they were
    mapped (uint8: 5K COCO test images at 384 px are 2.2 GB) and only the token ids travel, to the
    main process and from it to the rank that scores them. The ranks share the fused passes (COCO 5K
    at k = 128: up to 3.8M pairs) instead of waiting for the main process at the next barrier.
    """

    @configurable
    def __init__(
        self,
        dataset_name: str,
        *,
        model: nn.Module,
        rerank_k: int = 128,
        itm_batch: int = 64,
        topk: tuple[int, ...] = (1, 5, 10),
        distributed: bool = True,
        output_dir: str | None = None,
    ):
        """
        Args:
            dataset_name: the evaluated dataset.
            model: the coarse model (``itm_logits``); the same object that produces the embeddings.
            rerank_k: pairs re-scored per image and per text (``RETRIEVAL.RERANK_K``).
            itm_batch: pairs per fused forward (``RETRIEVAL.ITM_BATCH``).
            topk: the K of TR@K / IR@K.
            distributed: gather the embeddings and inputs of all ranks before scoring.
            output_dir: optional folder for ``retrieval_results.json``.
        """
        if rerank_k < max(topk):
            logger.warning(
                "RETRIEVAL.RERANK_K=%d is below the largest recall K=%d: R@K for K > k mixes ITM and"
                " ITC order",
                rerank_k,
                max(topk),
            )
        super().__init__(
            dataset_name,
            topk=topk,
            rerank_fn=self._rerank,
            rerank_k=rerank_k,
            distributed=distributed,
            output_dir=output_dir,
        )
        self._model = model
        self._itm_batch = itm_batch

    @classmethod
    def from_config(
        cls, cfg, dataset_name: str, output_dir: str | None = None, *, model: nn.Module
    ) -> dict:
        return {
            "dataset_name": dataset_name,
            "model": model,
            "rerank_k": cfg.RETRIEVAL.RERANK_K,
            "itm_batch": cfg.RETRIEVAL.ITM_BATCH,
            "output_dir": output_dir,
        }

    def reset(self):
        super().reset()
        self._pair_inputs = (
            {}
        )  # image_id -> (image (3, S, S) uint8, ids (k, T), mask (k, T)) on CPU

    def process(self, inputs: list[dict], outputs: list[dict]):
        """
        Args:
            inputs: mapped records with "image_id", "image" (3, S, S), "input_ids" and
                "attention_mask" (k, T) (one row per caption).
            outputs: dicts with "image_embedding" (D,) and "text_embeddings" (k, D).
        """
        super().process(inputs, outputs)
        for inp, out in zip(inputs, outputs):
            image_id = inp["image_id"]
            for key in ("image", "input_ids", "attention_mask"):
                if key not in inp:
                    raise KeyError(
                        f"image {image_id}: mapped input has no '{key}' for ITM re-ranking"
                    )
            ids, mask = inp["input_ids"].cpu(), inp["attention_mask"].cpu()
            if ids.dim() == 1:
                ids, mask = ids[None], mask[None]
            if ids.shape[0] != out["text_embeddings"].shape[0]:
                raise ValueError(
                    f"image {image_id}: {ids.shape[0]} tokenised captions but"
                    f" {out['text_embeddings'].shape[0]} text embeddings"
                )
            self._pair_inputs[image_id] = (inp["image"].cpu(), ids, mask)

    @property
    def _multi_process(self) -> bool:
        """Whether the ranks share the scoring (a distributed evaluation with more than one rank)."""
        return self._distributed and comm.get_world_size() > 1

    def evaluate(self) -> OrderedDict:
        """The base class's evaluation, with the ITM pairs scored by every rank in a multi-process run.

        Returns:
            ``OrderedDict(retrieval=...)`` on the main process, ``{}`` elsewhere.
        """
        if not self._multi_process:
            self._texts = {i: (ids, mask) for i, (_, ids, mask) in self._pair_inputs.items()}
            return super().evaluate()
        comm.synchronize()
        # The main process needs every record's token ids (to send them with the pairs) and which
        # rank holds each image; the images themselves stay on their ranks.
        parts = comm.gather(
            {i: (ids, mask) for i, (_, ids, mask) in self._pair_inputs.items()}, dst=0
        )
        if not comm.is_main_process():
            result = super().evaluate()  # the embeddings' gather; {} here
            self._score_sent_pairs()
            return result
        self._texts, self._owner = {}, {}
        for rank, part in enumerate(parts):
            self._texts.update(part)
            self._owner.update((i, rank) for i in part)
        self._pairs_sent = False
        try:
            return super().evaluate()
        except EvaluationCoverageError:
            self._pairs_sent = True  # raised on every rank: no rank waits for pairs
            raise
        finally:
            if not self._pairs_sent:  # nothing to re-score, or the main process failed first
                comm.all_gather(None)

    def _rerank(self, sim: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``rerank_fn`` hook: (N_img, N_txt) ITC scores -> (TR scores, IR scores)."""
        missing = [i for i in self.image_ids if i not in self._texts]
        if missing:
            raise KeyError(f"no mapped inputs for image {missing[0]} (ITM re-ranking)")
        # Rows: self.image_ids order; columns: each image's captions in record order (base class).
        ids = torch.cat([self._texts[i][0] for i in self.image_ids])
        mask = torch.cat([self._texts[i][1] for i in self.image_ids])
        if ids.shape[0] != sim.shape[1]:
            raise ValueError(f"{ids.shape[0]} tokenised texts for {sim.shape[1]} score columns")
        if not self._multi_process:
            images = torch.stack([self._pair_inputs[i][0] for i in self.image_ids])
            scorer = ITMPairScorer(self._model, images, ids, mask, batch_size=self._itm_batch)
        else:
            scorer = functools.partial(self._score_on_all_ranks, ids=ids, mask=mask)
        return topk_rerank(sim, k, scorer)

    def _score_on_all_ranks(
        self, image_index: torch.Tensor, text_index: torch.Tensor, *, ids, mask
    ) -> torch.Tensor:
        """Main process: send each rank the pairs of its images, score its own, gather the scores.

        Args:
            image_index, text_index: (P,) rows / columns of the score matrix.
            ids, mask: (N_txt, T) token ids / attention masks of the columns.

        Returns:
            (P,) match logits.
        """
        owner = torch.tensor([self._owner[i] for i in self.image_ids])[image_index]
        jobs, positions = [], []
        for rank in range(comm.get_world_size()):
            pos = torch.nonzero(owner == rank).flatten()
            rows, local_image = torch.unique(image_index[pos], return_inverse=True)
            cols, local_text = torch.unique(text_index[pos], return_inverse=True)
            jobs.append(
                {
                    "image_ids": [self.image_ids[r] for r in rows.tolist()],
                    "input_ids": ids[cols],
                    "attention_mask": mask[cols],
                    "pairs": torch.stack([local_image, local_text]).int(),  # (2, P_rank)
                }
            )
            positions.append(pos)
        comm.all_gather(jobs)
        self._pairs_sent = True
        answers = comm.gather(self._score_job(jobs[0]), dst=0)
        failed = [f"rank {r}: {a}" for r, a in enumerate(answers) if isinstance(a, str)]
        if failed:
            raise RuntimeError("ITM re-ranking failed on " + "; ".join(failed))
        scores = torch.empty(len(image_index))
        for pos, answer in zip(positions, answers):
            scores[pos] = answer
        return scores

    def _score_sent_pairs(self) -> None:
        """Every other process: score the pairs the main process sends (if any) and send them back."""
        jobs = comm.all_gather(None)[0]
        if jobs is None:
            return
        answer = self._score_job(jobs[comm.get_rank()])
        comm.gather(answer, dst=0)
        if isinstance(answer, str):
            raise RuntimeError(f"ITM re-ranking failed on rank {comm.get_rank()}: {answer}")

    def _score_job(self, job: dict) -> torch.Tensor | str:
        """(P_rank,) match logits of one rank's pairs, or the error's text (sent on, never hung)."""
        try:
            missing = [i for i in job["image_ids"] if i not in self._pair_inputs]
            if missing:
                raise KeyError(f"no mapped image {missing[0]} on this rank")
            if not job["image_ids"]:
                return torch.zeros(0)
            images = torch.stack([self._pair_inputs[i][0] for i in job["image_ids"]])
            scorer = ITMPairScorer(
                self._model,
                images,
                job["input_ids"],
                job["attention_mask"],
                batch_size=self._itm_batch,
            )
            pairs = job["pairs"].long()
            logger.info(
                "ITM re-ranking on rank %d: %d pairs of %d images",
                comm.get_rank(),
                pairs.shape[1],
                len(job["image_ids"]),
            )
            return scorer(pairs[0], pairs[1])
        except Exception as e:  # the main process raises it with the rank, after the gather
            logger.exception("ITM re-ranking failed")
            return f"{type(e).__name__}: {e}"
