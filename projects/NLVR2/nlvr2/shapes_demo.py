"""The NLVR2 runner of ``tools/demo_vl.py``: fine-tune on the shapes image pairs, measure accuracy on
the held-out pairs against the majority-label baseline, draw a few judged pairs."""

from __future__ import annotations

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

__all__ = ["run", "SHAPES_CONFIG"]

logger = logging.getLogger(__name__)

SHAPES_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "shapes.yaml")


def run(coarse_weights: str | None, output_dir: Path, opts: tuple = (), pictures: int = 4) -> dict:
    """Fine-tune ``FIBERNLVR2`` on ``shapes_train_nlvr2`` from ``coarse_weights`` (None: scratch)."""
    output_dir = Path(output_dir)
    cfg = load_config(
        SHAPES_CONFIG,
        [*opts, "MODEL.WEIGHTS", coarse_weights or "", "OUTPUT_DIR", str(output_dir)],
    )
    cfg.freeze()
    results, model, seconds = train_and_evaluate(NLVR2Trainer, cfg)
    test = DatasetCatalog.get(cfg.DATASETS.TEST[0])
    majority = Counter(r["label"] for r in DatasetCatalog.get(cfg.DATASETS.TRAIN[0])).most_common(1)
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
    return task_result(
        "NLVR2",
        "accuracy",
        results["nlvr2"]["accuracy"],
        baseline,
        seconds,
        drawn,
        baseline_name="majority label",
        metrics=results["nlvr2"],
    )
