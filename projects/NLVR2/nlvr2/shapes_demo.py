"""The NLVR2 runner of ``tools/demo_vl.py``: fine-tune on the shapes image pairs, measure accuracy on
the held-out pairs against the majority-label baseline, draw a few judged pairs."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import torch
from detectron2.data import DatasetCatalog

from fiber_d2.data.vl_transforms import read_vl_image
from fiber_d2.engine.setup import load_config
from fiber_d2.engine.shapes_demo import caption_picture, task_result, train_and_evaluate

from .mapper import NLVR2DatasetMapper
from .trainer import NLVR2Trainer

__all__ = ["run", "statement_kind", "accuracy_by_statement_kind", "SHAPES_CONFIG"]

logger = logging.getLogger(__name__)

SHAPES_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "shapes.yaml")


def statement_kind(sentence: str) -> str:
    """The template of a shapes-world statement (``fiber_d2.data.shapes_vl``), "other" for any
    other sentence."""
    if sentence.startswith("both images contain "):
        return "both images contain ..."
    if " image contains " in sentence:
        return "the left / right image contains ..."
    if " has more " in sentence:
        return "the left / right image has more ...s"
    return "other"


def accuracy_by_statement_kind(
    train: list[dict], test: list[dict], predictions: dict[str, int]
) -> dict[str, dict[str, float]]:
    """Per statement kind of ``test``: the accuracy (percent) of ``predictions`` ({identifier:
    0/1}) and of the kind's majority training label (a text-only baseline)."""
    labels: dict[str, Counter] = {}
    for r in train:
        labels.setdefault(statement_kind(r["sentence"]), Counter())[r["label"]] += 1
    rows: dict[str, list[tuple[bool, bool]]] = {}
    for r in test:
        kind = statement_kind(r["sentence"])
        prior = labels[kind].most_common(1)[0][0] if kind in labels else 1
        hit = predictions[r["identifier"]] == r["label"]
        rows.setdefault(kind, []).append((hit, prior == r["label"]))
    return {
        kind: {
            "value": 100.0 * sum(h for h, _ in v) / len(v),
            "baseline": 100.0 * sum(b for _, b in v) / len(v),
        }
        for kind, v in sorted(rows.items())
    }


def run(coarse_weights: str | None, output_dir: Path, opts: tuple = (), pictures: int = 4) -> dict:
    """Fine-tune ``FIBERNLVR2`` on ``shapes_train_nlvr2`` from ``coarse_weights`` (None: scratch)."""
    output_dir = Path(output_dir)
    cfg = load_config(
        SHAPES_CONFIG,
        [*opts, "MODEL.WEIGHTS", coarse_weights or "", "OUTPUT_DIR", str(output_dir)],
    )
    cfg.freeze()
    results, model, seconds = train_and_evaluate(NLVR2Trainer, cfg)
    test_name = cfg.DATASETS.TEST[0]
    test, train = DatasetCatalog.get(test_name), DatasetCatalog.get(cfg.DATASETS.TRAIN[0])
    majority = Counter(r["label"] for r in train).most_common(1)
    baseline = 100.0 * sum(r["label"] == majority[0][0] for r in test) / len(test)
    mapper = NLVR2DatasetMapper(cfg, False)
    drawn = []
    with torch.no_grad():
        for record in test[:pictures]:
            pred = model([mapper(record)])[0]["prediction"]
            images = [read_vl_image(record, f"file_name_{k}", f"image_{k}") for k in (0, 1)]
            lines = [record["sentence"], f"judged: {bool(pred)}   (truth: {bool(record['label'])})"]
            path = output_dir / "pictures" / f"nlvr2_{record['identifier']}.png"
            drawn.append(caption_picture(images, lines, path))
    # the evaluator's predictions.json (NLVR2Trainer.build_evaluator's folder), by statement kind
    written = output_dir / "inference" / test_name / "predictions.json"
    predicted = {
        p["identifier"]: int(p["prediction"] == "True")
        for p in json.loads(written.read_text(encoding="utf-8"))
    }
    breakdown = {
        "by": "statement",
        "baseline_name": "majority label of the statement kind",
        "rows": accuracy_by_statement_kind(train, test, predicted),
    }
    return task_result(
        "NLVR2",
        "accuracy",
        results["nlvr2"]["accuracy"],
        baseline,
        seconds,
        drawn,
        baseline_name="majority label",
        metrics=results["nlvr2"],
        breakdown=breakdown,
    )
