"""Caption evaluation: ``caption.json`` and the COCO caption metrics from pycocoevalcap.

The original writes ``result/caption.json`` (``{image_id, caption}``) and scores it outside its code
with coco-caption; here the evaluator does both. Texts go through coco-caption's PTB tokenizer (Java)
when Java is present, else a lower-case / punctuation-stripping fallback (logged). BLEU-4 and CIDEr
always run; METEOR needs Java, SPICE Java plus the Stanford CoreNLP jars that pycocoevalcap downloads
on first use (``pycocoevalcap/spice/get_stanford_models.py``): without them they are listed as skipped.
Scores are x100 (COCO convention: CIDEr 144.4).
"""

from __future__ import annotations

import itertools
import json
import logging
import numbers
import os
import re
import shutil
from collections import OrderedDict
from collections.abc import Mapping, Sequence

from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

from fiber_d2.checkpoint.safe_io import write_whole
from fiber_d2.data.datasets.common import BadRecordError
from fiber_d2.evaluation.integrity import SeenRecords

__all__ = ["CaptionEvaluator", "caption_metrics", "metric_availability"]

logger = logging.getLogger(__name__)

METRICS = ("BLEU", "CIDEr", "METEOR", "SPICE")


def _spice_models_present() -> bool:
    import pycocoevalcap.spice as spice

    lib = os.path.join(os.path.dirname(spice.__file__), "lib")
    return os.path.isdir(lib) and any(
        n.startswith("stanford-corenlp-") and n.endswith(".jar") for n in os.listdir(lib)
    )


def metric_availability(metrics: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """(metrics that can run, {skipped metric: reason}).

    Raises:
        ValueError: an unknown metric name.
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"CAPTION.METRICS: unknown {unknown}; known: {list(METRICS)}")
    java = shutil.which("java") is not None
    run, skipped = [], {}
    for m in metrics:
        if m in ("METEOR", "SPICE") and not java:
            skipped[m] = "no Java runtime"
        elif m == "SPICE" and not _spice_models_present():
            skipped[m] = (
                "Stanford CoreNLP jars missing (pycocoevalcap/spice/get_stanford_models.py)"
            )
        else:
            run.append(m)
    return run, skipped


def _simple_tokenize(texts: Mapping) -> dict:
    out = {}
    for key, captions in texts.items():
        out[key] = [" ".join(re.findall(r"[a-z0-9]+", c.lower())) for c in captions]
    return out


def _tokenize(texts: Mapping) -> dict:
    if shutil.which("java") is None:
        logger.warning("no Java runtime: captions are tokenized by a simple Python fallback")
        return _simple_tokenize(texts)
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in texts.items()})


def caption_metrics(
    references: Mapping[object, Sequence[str]],
    predictions: Mapping[object, str],
    metrics: Sequence[str] = METRICS,
) -> tuple[dict[str, float], dict[str, str]]:
    """Corpus metrics of one predicted caption per image against its references.

    Args:
        references: {image id: [reference, ...]} (each non-empty).
        predictions: {image id: caption}, the same ids.
        metrics: among "BLEU" (reported as BLEU-4), "CIDEr", "METEOR", "SPICE".

    Returns:
        ({"BLEU-4": ..., "CIDEr": ..., ...} x100, {skipped metric: reason}).
    """
    if set(references) != set(predictions):
        missing = sorted(map(str, set(references) ^ set(predictions)))[:5]
        raise ValueError(f"references and predictions cover different images, e.g. {missing}")
    for key, refs in references.items():
        if not refs:
            raise ValueError(f"image {key}: the reference set has no caption")
    run, skipped = metric_availability(metrics)
    keys = list(references)
    index = {k: i for i, k in enumerate(keys)}
    gts = _tokenize({index[k]: list(references[k]) for k in keys})
    res = _tokenize({index[k]: [predictions[k]] for k in keys})
    scores: dict[str, float] = {}
    if "BLEU" in run:
        from pycocoevalcap.bleu.bleu import Bleu

        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        scores["BLEU-4"] = 100.0 * float(bleu[3])
    if "CIDEr" in run:
        from pycocoevalcap.cider.cider import Cider

        scores["CIDEr"] = 100.0 * float(Cider().compute_score(gts, res)[0])
    if "METEOR" in run:
        from pycocoevalcap.meteor.meteor import Meteor

        scores["METEOR"] = 100.0 * float(Meteor().compute_score(gts, res)[0])
    if "SPICE" in run:
        from pycocoevalcap.spice.spice import Spice

        scores["SPICE"] = 100.0 * float(Spice().compute_score(gts, res)[0])
    for metric, reason in skipped.items():
        logger.warning("caption metric %s skipped: %s", metric, reason)
    return scores, skipped


def _json_id(image_id):
    """Integer ids stay integers (COCO); any other id is written as its string, as it is ("007"
    stays "007": converting it would merge it with 7 and lose the record's own id)."""
    if isinstance(image_id, numbers.Integral) and not isinstance(image_id, bool):
        return int(image_id)
    return str(image_id)


class CaptionEvaluator(DatasetEvaluator):
    """Collects the generated captions of a caption dataset, writes ``caption.json`` and reports
    BLEU-4 / CIDEr (/ METEOR / SPICE) under the task "caption".

    Args:
        dataset_name: registered caption dataset (one record per image with ``captions``).
        output_dir: where ``caption.json`` is written (None: not written).
        metrics: metric names (``CAPTION.METRICS``).
        distributed: gather the predictions of every rank.

    Each image of the dataset must be evaluated exactly once (``EvaluationCoverageError``
    otherwise).
    """

    def __init__(
        self,
        dataset_name: str,
        output_dir: str | None = None,
        metrics: Sequence[str] = METRICS,
        distributed: bool = True,
    ):
        self.dataset_name = dataset_name
        self.output_dir = output_dir
        self.metrics = list(metrics)
        metric_availability(self.metrics)  # unknown names fail early
        self.distributed = distributed
        self._seen = SeenRecords(dataset_name, "CaptionEvaluator", distributed)
        self._predictions: list[dict] = []

    def reset(self):
        self._predictions = []
        self._seen.reset()

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            self._seen.add(inp["image_id"])
            refs = inp.get("captions")
            if isinstance(refs, str):
                refs = [refs]
            if not refs or not any(isinstance(r, str) and r.strip() for r in refs):
                raise BadRecordError(  # a user error: one ``error:`` line from train_net
                    f"{self.dataset_name}: image {inp.get('image_id')} ({inp.get('file_name')}) "
                    "has no reference caption"
                )
            self._predictions.append(
                {
                    "image_id": inp["image_id"],
                    "caption": out["caption"],
                    "references": [r for r in refs if isinstance(r, str) and r.strip()],
                }
            )

    def evaluate(self):
        self._seen.check()
        predictions = self._predictions
        if self.distributed:
            comm.synchronize()
            predictions = list(itertools.chain(*comm.gather(predictions, dst=0)))
            if not comm.is_main_process():
                return {}
        if not predictions:
            logger.warning("%s: no caption was generated", self.dataset_name)
            return {}
        unique = {p["image_id"]: p for p in predictions}  # each image once (checked above)
        if self.output_dir:
            os.makedirs(self.output_dir, exist_ok=True)
            path = os.path.join(self.output_dir, "caption.json")
            with write_whole(path, "w", encoding="utf-8") as f:
                json.dump(
                    [{"image_id": _json_id(k), "caption": p["caption"]} for k, p in unique.items()],
                    f,
                    indent=1,
                )
            logger.info("Wrote %d captions to %s", len(unique), path)
        scores, skipped = caption_metrics(
            {k: p["references"] for k, p in unique.items()},
            {k: p["caption"] for k, p in unique.items()},
            self.metrics,
        )
        # every score on one line: detectron2's copypaste lines leave out names with a "-" (BLEU-4)
        logger.info(
            "%s: %s",
            self.dataset_name,
            ", ".join(f"{m} {v:.2f}" for m, v in scores.items()) or "no metric computed",
        )
        if skipped:
            logger.info(
                "%s: skipped metrics: %s",
                self.dataset_name,
                "; ".join(f"{m} ({r})" for m, r in skipped.items()),
            )
        return OrderedDict({"caption": scores})
