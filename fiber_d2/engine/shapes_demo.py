"""Helpers of the projects' shapes-world demo runners (``<project>/shapes_demo.py``, used by
``tools/demo_vl.py``).

A runner is ``run(coarse_weights: str | None, output_dir: Path) -> dict`` returning :func:`task_result`:
it fine-tunes (or evaluates) its task from the coarse checkpoint (None: from scratch), measures its
metric and its trivial baseline, and writes a few pictures under ``output_dir``.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from detectron2.utils.env import seed_all_rng
from PIL import Image, ImageDraw

__all__ = ["seed_task", "train_and_evaluate", "task_result", "caption_picture"]

logger = logging.getLogger(__name__)


def seed_task(cfg) -> None:
    """Seed python, numpy and torch from ``cfg.SEED`` (< 0: a random seed), as ``train_net.py``'s
    setup does. The runners share one process, so without it a task's initialisation and data order
    would depend on what ran before it (``--tasks``, ``--ablation``)."""
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED)


def train_and_evaluate(trainer_cls, cfg) -> tuple[dict, torch.nn.Module, float]:
    """Train ``cfg`` with ``trainer_cls`` (``MODEL.WEIGHTS`` loaded first) and evaluate its test sets;
    the random state is seeded first (:func:`seed_task`).

    Returns:
        (the final evaluation results, the trained model in eval mode, wall seconds).
    """
    start = time.perf_counter()
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    seed_task(cfg)
    trainer = trainer_cls(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    results = getattr(trainer, "_last_eval_results", None) or trainer_cls.test(cfg, trainer.model)
    model = trainer.model.eval()
    return dict(results), model, time.perf_counter() - start


def task_result(
    task: str, metric: str, value: float, baseline: float, seconds: float, pictures: list, **extra
) -> dict:
    """The dict a runner returns (``task``, ``metric``, ``value``, ``baseline``, ``seconds``,
    ``pictures`` as strings, plus ``extra``, e.g. ``baseline_name``, ``other_baselines`` ({name: value}),
    ``metrics``, ``breakdown`` (the metric by part of the test set beside a baseline: ``{"by": what
    the parts are, "baseline_name": str, "rows": {part: {"value": float, "baseline": float}}}``)).
    """
    return {
        "task": task,
        "metric": metric,
        "value": float(value),
        "baseline": float(baseline),
        "seconds": float(seconds),
        "pictures": [str(p) for p in pictures],
        **extra,
    }


def caption_picture(images: list, lines: list[str], path: Path, scale: int = 2) -> Path:
    """Save ``images`` (HWC uint8 RGB arrays) side by side, enlarged ``scale`` times, above text
    ``lines``; returns ``path``."""
    tiles = [
        Image.fromarray(im).resize((im.shape[1] * scale, im.shape[0] * scale)) for im in images
    ]
    width = sum(t.width for t in tiles) + 8 * (len(tiles) - 1)
    height = max(t.height for t in tiles) + 16 * len(lines) + 8
    canvas = Image.new("RGB", (max(width, 360), height), (255, 255, 255))
    x = 0
    for t in tiles:
        canvas.paste(t, (x, 0))
        x += t.width + 8
    draw = ImageDraw.Draw(canvas)
    y = max(t.height for t in tiles) + 4
    for line in lines:
        draw.text((4, y), line, fill=(0, 0, 0))
        y += 16
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
