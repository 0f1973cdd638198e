"""Captioning on the built-in shapes world: fine-tune the tiny FIBER (``configs/shapes_mle.yaml``), decode
the validation images with beam search, score BLEU-4 / CIDEr, compare with always emitting the most
frequent training caption, and draw a few captioned pictures.

    from captioning.shapes_demo import run
    summary = run("output/demo/coarse/model_final.pth", Path("output/demo_vl/captioning"))

``run`` is the captioning runner of ``make demo-vl`` (``tools/demo_vl.py``); with ``coarse_weights=None``
the towers start from scratch.
"""

from __future__ import annotations

import json
import logging
import textwrap
import time
from collections import Counter
from pathlib import Path

from detectron2.data import DatasetCatalog
from PIL import Image, ImageDraw

from fiber_d2.engine.shapes_demo import seed_task, task_result

from .evaluator import caption_metrics
from .trainer import CaptionTrainer, load_captioning_config

__all__ = ["SHAPES_CONFIG", "most_frequent_caption_baseline", "run"]

logger = logging.getLogger(__name__)

SHAPES_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "shapes_mle.yaml"


def most_frequent_caption_baseline(train_name: str, test_name: str, metrics) -> tuple[str, dict]:
    """Scores of emitting the most frequent training caption for every test image."""
    counts = Counter(r["caption"] for r in DatasetCatalog.get(train_name))
    caption = min(counts, key=lambda c: (-counts[c], c))  # ties: alphabetical, deterministic
    refs = {r["image_id"]: r["captions"] for r in DatasetCatalog.get(test_name)}
    scores, _ = caption_metrics(refs, {k: caption for k in refs}, metrics)
    return caption, scores


def _draw(file_name: str, caption: str, path: Path, scale: int = 2) -> None:
    image = Image.open(file_name).convert("RGB")
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    lines = textwrap.wrap(caption, width=max(20, image.width // 7)) or [""]
    canvas = Image.new("RGB", (image.width, image.height + 14 * len(lines) + 8), "white")
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((4, image.height + 4 + 14 * i), line, fill="black")
    canvas.save(path)


def run(coarse_weights: str | None, output_dir: Path, *, max_iter: int | None = None) -> dict:
    """Fine-tune, evaluate and summarise captioning on the shapes world.

    Args:
        coarse_weights: a coarse-stage checkpoint (``FIBERCoarse``'s ``model_final.pth``) or None
            (from scratch).
        output_dir: where the run, ``caption.json`` and the pictures go.
        max_iter: override of ``SOLVER.MAX_ITER`` (tests).

    Returns:
        :func:`fiber_d2.engine.shapes_demo.task_result`'s dict (metric CIDEr, baseline: the most
        frequent training caption) plus "metrics" (BLEU-4, CIDEr), "baseline_metrics",
        "train_seconds", "eval_seconds", "coarse_weights", "caption_json".
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    opts = ["OUTPUT_DIR", str(output_dir / "train"), "MODEL.WEIGHTS", coarse_weights or ""]
    if max_iter is not None:
        opts += ["SOLVER.MAX_ITER", str(max_iter)]
    cfg = load_captioning_config(str(SHAPES_CONFIG), opts)
    test_name = cfg.DATASETS.TEST[0]
    train_cfg = cfg.clone()
    train_cfg.DATASETS.TEST = ()  # the evaluation is timed on its own below
    train_cfg.freeze()
    start = time.perf_counter()
    seed_task(train_cfg)
    trainer = CaptionTrainer(train_cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    train_seconds = time.perf_counter() - start

    eval_dir = output_dir / "inference" / test_name
    start = time.perf_counter()
    evaluator = CaptionTrainer.build_evaluator(cfg, test_name, str(eval_dir))
    results = CaptionTrainer.test(cfg, trainer.model, evaluators=[evaluator])
    eval_seconds = time.perf_counter() - start
    metrics = dict(results.get("caption", results))

    baseline_caption, baseline = most_frequent_caption_baseline(
        cfg.DATASETS.TRAIN[0], test_name, cfg.CAPTION.METRICS
    )
    caption_json = eval_dir / "caption.json"
    generated = {c["image_id"]: c["caption"] for c in json.loads(caption_json.read_text())}
    pictures = []
    for record in DatasetCatalog.get(test_name)[:4]:
        path = output_dir / f"caption_{record['image_id']}.png"
        _draw(record["file_name"], generated.get(record["image_id"], ""), path)
        pictures.append(str(path))
    summary = task_result(
        "captioning",
        "CIDEr",
        metrics["CIDEr"],
        baseline["CIDEr"],
        train_seconds + eval_seconds,
        pictures,
        baseline_name=f"most frequent training caption '{baseline_caption}'",
        other_baselines={"BLEU-4 of that caption": baseline["BLEU-4"]},
        metrics=metrics,
        baseline_metrics=baseline,
        train_seconds=round(train_seconds, 1),
        eval_seconds=round(eval_seconds, 1),
        coarse_weights=coarse_weights,
        caption_json=str(caption_json),
    )
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    logger.info("captioning on shapes: %s", json.dumps(summary))
    return summary
