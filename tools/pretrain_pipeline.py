#!/usr/bin/env python
"""FIBER's coarse-to-fine recipe in one command: coarse pre-training, then the fine-grained detector
initialised from it, then evaluation, a summary and (optionally) prediction images.

    python tools/pretrain_pipeline.py --coarse-config configs/Demo/coarse_tiny.yaml \\
        --fine-config configs/Demo/fine_tiny.yaml --output-dir output/demo [--resume] [--num-gpus N] \\
        [--skip-coarse] [--visualize 6] [KEY VALUE ...]

Each stage is an ordinary ``tools/train_net.py`` run (its own process, log and ``--resume``) with
``OUTPUT_DIR`` = ``<output-dir>/coarse`` and ``<output-dir>/fine``; the fine stage gets
``MODEL.WEIGHTS <output-dir>/coarse/model_final.pth`` (fiber_d2's checkpointer re-roots the coarse backbone
into the detector). Trailing ``KEY VALUE`` overrides apply to both stages. ``--skip-coarse`` trains the
fine stage from scratch with the same budget (the ablation). A run killed at any point continues with
``--resume``: a finished coarse stage is not repeated, an interrupted one resumes from its last checkpoint.
"""

from __future__ import annotations

import fiber_d2  # noqa: F401  # isort: skip  (imported first: registers FIBER, quiets fvcore)

import argparse
import json
import logging
import os
import subprocess
import sys
import time

from fiber_d2.checkpoint import run_finished
from fiber_d2.checkpoint.safe_io import write_whole
from fiber_d2.engine.cli import check_output_dir, run_child
from fiber_d2.engine.setup import ConfigError, load_config

logger = logging.getLogger("fiber_d2.pretrain_pipeline")

TRAIN_NET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_net.py")

# (stage, dataset-result key, metric, label) rows of the summary table.
SUMMARY_ROWS = [
    ("coarse", "retrieval", "TR@1", "retrieval TR@1 (text for image)"),
    ("coarse", "retrieval", "IR@1", "retrieval IR@1 (image for text)"),
    ("fine", "bbox", "AP", "detection bbox AP"),
    ("fine", "bbox", "AP50", "detection bbox AP50"),
    ("fine", "grounding", "R@1", "phrase grounding R@1"),
    ("fine", "grounding", "R@5", "phrase grounding R@5"),
]


def run_stage(
    config: str, output_dir: str, opts: list[str], *, resume: bool, num_gpus: int
) -> dict:
    """Run one ``train_net.py`` stage in a subprocess; returns its ``results.json``."""
    results_file = os.path.join(output_dir, "results.json")
    # finished by this run: a final that last_checkpoint names, evaluated after it (files of an
    # earlier run that this one started over from are not)
    if resume and run_finished(output_dir):
        logger.info("Stage %s already finished in %s; not repeated.", config, output_dir)
    else:
        cmd = [sys.executable, TRAIN_NET, "--config-file", config, "--num-gpus", str(num_gpus)]
        cmd += ["--resume"] if resume else []
        cmd += list(opts) + ["OUTPUT_DIR", output_dir]
        logger.info("Running: %s", " ".join(cmd))
        try:
            run_child(cmd)  # it ends with this process
        except subprocess.CalledProcessError as e:  # the stage printed its own error above
            log = os.path.join(output_dir, "log.txt")
            seen = f"; its log: {log}" if os.path.isfile(log) else ""
            sys.exit(
                f"error: stage {config} failed (exit status {e.returncode}{seen}); once the cause "
                "is fixed, --resume continues from its last checkpoint"
            )
    with open(results_file) as f:
        return json.load(f)


def summary_table(results: dict[str, dict], retrieval_chance: float | None = None) -> str:
    """A plain-text table of the headline metrics of both stages; the retrieval rows name the
    recall of a random ranking when ``retrieval_chance`` is given."""
    lines = [f"{'metric':<36} {'value':>8}", "-" * 45]
    for stage, task, metric, label in SUMMARY_ROWS:
        value = results.get(stage, {}).get(task, {}).get(metric)
        line = f"{label:<36} {('%.2f' % value) if value is not None else 'n/a':>8}"
        if task == "retrieval" and value is not None and retrieval_chance is not None:
            line += f"  (chance {retrieval_chance:.2f})"
        lines.append(line)
    return "\n".join(lines)


def retrieval_chance(cfg) -> float | None:
    """R@1 (percent) of a random ranking on the coarse stage's first test set: 100 / its images."""
    from detectron2.data import DatasetCatalog

    test_sets = cfg.DATASETS.TEST
    return 100.0 / len(DatasetCatalog.get(test_sets[0])) if test_sets else None


def towers_from_scratch(cfg) -> bool:
    """The coarse stage starts from random towers (no checkpoint, no ImageNet / RoBERTa weights)."""
    return not (cfg.MODEL.WEIGHTS or cfg.MODEL.SWIN.WEIGHTS or cfg.MODEL.LANGUAGE_BACKBONE.WEIGHTS)


def flatten_results(results: dict) -> dict:
    """``{dataset: {task: metrics}}`` (several test sets) or ``{task: metrics}`` -> ``{task: metrics}``."""
    flat = {}
    for key, value in results.items():
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def visualize(
    fine_config: str, weights: str, out_dir: str, opts: list[str], count: int
) -> list[str]:
    """Draw ground truth and the fine model's phrase-grounding predictions side by side on ``count``
    held-out records (small images upscaled to at least 512 px, so the labels are readable)."""
    import cv2
    import numpy as np
    from detectron2.data import DatasetCatalog
    from detectron2.utils.colormap import colormap

    from fiber_d2.predictor import FIBERPredictor
    from fiber_d2.visualize import draw_boxes, draw_grounding, side_by_side

    cfg = load_config(fine_config, list(opts) + ["MODEL.WEIGHTS", weights])
    predictor = FIBERPredictor(cfg)
    names = [n for n in cfg.DATASETS.TEST if "grounding" in n] or list(cfg.DATASETS.TEST)
    records = DatasetCatalog.get(names[0])[:count]
    palette = colormap(rgb=True, maximum=1)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for r in records:
        image = cv2.imread(r["file_name"])
        rgb = np.ascontiguousarray(image[:, :, ::-1])
        if "phrases" in r:
            spans = [tuple(p["tokens_positive"][0]) for p in r["phrases"]]
            out = predictor(image, r["caption"], phrases=spans)
            gt = [(box, p["text"], k) for k, p in enumerate(r["phrases"]) for box in p["boxes"]]
        else:
            out = predictor(image, r.get("caption", ""))
            gt = []
        truth = draw_boxes(
            rgb,
            np.array([g[0] for g in gt], dtype=np.float64).reshape(-1, 4),
            [g[1] for g in gt],
            [palette[g[2] % len(palette)] for g in gt],
        )
        pred = draw_grounding(rgb, out["instances"], out["label_names"], 0.3)
        picture = side_by_side([truth, pred], ["ground truth", "prediction (score >= 0.3)"])
        path = os.path.join(out_dir, f"{r['image_id']}.jpg")
        cv2.imwrite(path, picture[:, :, ::-1])
        written.append(path)
    return written


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--coarse-config", default="configs/Demo/coarse_tiny.yaml")
    p.add_argument("--fine-config", default="configs/Demo/fine_tiny.yaml")
    p.add_argument("--output-dir", default="output/pipeline")
    p.add_argument("--skip-coarse", action="store_true", help="fine stage from scratch (ablation)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")
    p.add_argument("--num-gpus", type=int, default=1, help="processes per stage")
    p.add_argument("--visualize", type=int, default=0, help="prediction images to write")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for both stages")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[pipeline] %(message)s")
    try:  # both stages' configs before the first one trains (the fine one ran only after it)
        if args.num_gpus < 1 or args.visualize < 0:
            raise ConfigError(
                f"--num-gpus must be at least 1 and --visualize at least 0, got {args.num_gpus} "
                f"and {args.visualize}"
            )
        for config in ([] if args.skip_coarse else [args.coarse_config]) + [args.fine_config]:
            load_config(config, list(args.opts))
        check_output_dir(args.output_dir, "--output-dir")
    except ConfigError as e:
        sys.exit(f"error: {e}")

    start = time.perf_counter()
    results = {}
    fine_opts = list(args.opts)
    if not args.skip_coarse:
        coarse_dir = os.path.join(args.output_dir, "coarse")
        results["coarse"] = flatten_results(
            run_stage(
                args.coarse_config,
                coarse_dir,
                args.opts,
                resume=args.resume,
                num_gpus=args.num_gpus,
            )
        )
        fine_opts += ["MODEL.WEIGHTS", os.path.join(coarse_dir, "model_final.pth")]
    fine_dir = os.path.join(args.output_dir, "fine")
    results["fine"] = flatten_results(
        run_stage(args.fine_config, fine_dir, fine_opts, resume=args.resume, num_gpus=args.num_gpus)
    )
    if args.visualize:
        results["predictions"] = visualize(
            args.fine_config,
            os.path.join(fine_dir, "model_final.pth"),
            os.path.join(args.output_dir, "predictions"),
            args.opts,
            args.visualize,
        )
    results["minutes"] = round((time.perf_counter() - start) / 60, 2)
    with write_whole(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump(results, f, indent=2)
    chance, scratch = None, False
    if not args.skip_coarse:
        coarse_cfg = load_config(args.coarse_config, list(args.opts))
        chance, scratch = retrieval_chance(coarse_cfg), towers_from_scratch(coarse_cfg)
    print(f"\nfiber_d2 coarse-to-fine summary ({args.output_dir}, {results['minutes']} min)")
    print(summary_table(results, chance))
    recall = results.get("coarse", {}).get("retrieval", {})
    near_chance = (
        chance is not None and max(recall.get(k, 0) for k in ("TR@1", "IR@1")) < 2 * chance
    )
    if scratch and recall and near_chance:
        print(
            "retrieval near chance: this coarse stage trains the towers from scratch for the "
            "detector, and its ITC does not learn to retrieve here (README, 'Demo status'); "
            "`make demo-vl` pre-trains the image tower first, and its retrieval learns"
        )
    if args.visualize:
        print(f"prediction images: {os.path.join(args.output_dir, 'predictions')}")
    return results


if __name__ == "__main__":
    main()
