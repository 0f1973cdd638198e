"""Captioning on the built-in shapes world: fine-tune the tiny FIBER (``configs/shapes_mle.yaml``), decode
the validation images with beam search, score BLEU-4 / CIDEr, compare with always emitting the most
frequent training caption, check which shapes the captions name (:func:`category_agreement`), and draw
a few captioned pictures.

    from captioning.shapes_demo import run
    summary = run("output/demo/coarse/model_final.pth", Path("output/demo_vl/captioning"))

``run`` is the captioning runner of ``make demo-vl`` (``tools/demo_vl.py``); with ``coarse_weights=None``
the towers start from scratch.
"""

from __future__ import annotations

import json
import logging
import re
import textwrap
import time
from collections import Counter
from pathlib import Path

from detectron2.data import DatasetCatalog
from PIL import Image, ImageDraw

from fiber_d2.checkpoint.safe_io import write_whole
from fiber_d2.data.shapes import CATEGORY_NAMES
from fiber_d2.engine.shapes_demo import seed_task, task_result

from .evaluator import caption_metrics
from .trainer import CaptionTrainer, load_captioning_config

__all__ = [
    "SHAPES_CONFIG",
    "category_agreement",
    "most_frequent_caption_baseline",
    "named_categories",
    "run",
]

logger = logging.getLogger(__name__)

SHAPES_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "shapes_mle.yaml"


def most_frequent_caption_baseline(train_name: str, test_name: str, metrics) -> tuple[str, dict]:
    """Scores of emitting the most frequent training caption for every test image."""
    counts = Counter(r["caption"] for r in DatasetCatalog.get(train_name))
    caption = min(counts, key=lambda c: (-counts[c], c))  # ties: alphabetical, deterministic
    refs = {r["image_id"]: r["captions"] for r in DatasetCatalog.get(test_name)}
    scores, _ = caption_metrics(refs, {k: caption for k in refs}, metrics)
    return caption, scores


_CATEGORY = re.compile(r"\b(" + "|".join(CATEGORY_NAMES) + r")s?\b")


def named_categories(text: str) -> set[str]:
    """The shapes categories a caption names with colour and kind: "a large red circle left of the
    blue squares" -> {"red circle", "blue square"} ("the triangles" names none)."""
    return set(_CATEGORY.findall(text))


def category_agreement(generated: dict, references: dict) -> dict[str, float]:
    """Whether captions name what their image holds, which CIDEr does not isolate from the captions'
    form.

    Args:
        generated: image id -> generated caption.
        references: image id -> its reference captions; the categories they name are the image's
            (a shapes scene caption names every shape).

    Returns:
        percentages, micro-averaged over images: "category_precision" (named categories the image
        holds / named categories), "category_recall" (held categories named / held categories), and
        both at chance ("..._chance"): every caption scored against every other image.
    """
    named = {k: named_categories(v) for k, v in generated.items()}
    held = {k: set().union(*(named_categories(r) for r in references[k])) for k in generated}

    def scores(pairs):
        hits = sum(len(named[g] & held[h]) for g, h in pairs)
        n_named = sum(len(named[g]) for g, _ in pairs)
        n_held = sum(len(held[h]) for _, h in pairs)
        return 100.0 * hits / max(n_named, 1), 100.0 * hits / max(n_held, 1)

    own = scores([(k, k) for k in generated])
    chance = scores([(g, h) for g in generated for h in generated if h != g])
    return {
        "category_precision": own[0],
        "category_recall": own[1],
        "category_precision_chance": chance[0],
        "category_recall_chance": chance[1],
    }


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


def run(coarse_weights: str | None, output_dir: Path, opts: tuple = ()) -> dict:
    """Fine-tune, evaluate and summarise captioning on the shapes world.

    Args:
        coarse_weights: a coarse-stage checkpoint (``FIBERCoarse``'s ``model_final.pth``) or None
            (from scratch).
        output_dir: where the run, ``caption.json``, the pictures and ``summary.json`` (the
            returned dict) go.
        opts: config overrides (``make demo-vl``'s trailing ``KEY VALUE`` pairs).

    Returns:
        :func:`fiber_d2.engine.shapes_demo.task_result`'s dict (metric CIDEr, baseline: the most
        frequent training caption) plus "metrics" (BLEU-4, CIDEr, :func:`category_agreement`),
        "baseline_metrics", "train_seconds", "eval_seconds", "coarse_weights", "caption_json".
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    opts = [*opts, "OUTPUT_DIR", str(output_dir / "train"), "MODEL.WEIGHTS", coarse_weights or ""]
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
    test_records = DatasetCatalog.get(test_name)
    metrics.update(
        category_agreement(generated, {r["image_id"]: r["captions"] for r in test_records})
    )
    pictures = []
    for record in test_records[:4]:
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
    with write_whole(str(output_dir / "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    logger.info("captioning on shapes: %s", json.dumps(summary))
    return summary
