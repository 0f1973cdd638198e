"""The retrieval runner of ``tools/demo_vl.py``: the coarse stage's own ITC retrieval on the held-out
shapes captions (no fine-tuning), against chance (R@1 = 100 / number of images), with the ITC settings
of the VL Demo's coarse stage (``configs/shapes_itc_vl.yaml``)."""

from __future__ import annotations

import time
from pathlib import Path

from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

from fiber_d2.checkpoint.checkpointer import FIBERCheckpointer
from fiber_d2.engine.shapes_demo import seed_task, task_result
from fiber_d2.engine.trainer import FIBERTrainer

from .config import add_retrieval_config

__all__ = ["run", "SHAPES_CONFIG"]

SHAPES_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "shapes_itc_vl.yaml")


def run(coarse_weights: str | None, output_dir: Path, opts: tuple = ()) -> dict:
    """Text (TR) and image (IR) retrieval R@1 of the coarse checkpoint (None: random weights)."""
    from fiber_d2.engine.setup import load_config

    start = time.perf_counter()
    cfg = load_config(
        SHAPES_CONFIG,
        [*opts, "OUTPUT_DIR", str(output_dir)],
        extra_defaults=(add_retrieval_config,),
    )
    cfg.freeze()
    seed_task(cfg)  # the random towers of the from-scratch row repeat run to run
    model = build_model(cfg)
    if coarse_weights:
        FIBERCheckpointer(model).load(coarse_weights)
    results = FIBERTrainer.test(cfg, model)
    metrics = results["retrieval"]
    chance = 100.0 / len(DatasetCatalog.get(cfg.DATASETS.TEST[0]))
    return task_result(
        "retrieval (ITC, no fine-tuning)",
        "TR@1 / IR@1 mean",
        (metrics["TR@1"] + metrics["IR@1"]) / 2,
        chance,
        time.perf_counter() - start,
        [],
        baseline_name="chance",
        metrics=metrics,
    )
