#!/usr/bin/env python
"""FIBER's high-level half on the shapes world in one command (``make demo-vl``): the image tower's
supervised pre-training, the coarse stage, then retrieval, VQA, NLVR2 and captioning from its
checkpoint, one summary table and a few pictures.

    python tools/demo_vl.py [--output-dir output/demo_vl] [--swin-weights PATH]
        [--coarse-weights PATH] [--ablation] [--resume] [--tasks retrieval,vqa,nlvr2,captioning]
        [KEY VALUE ...]

As FIBER's image tower starts from ImageNet, the Demo's starts from a supervised pre-training on the
shapes world with 2,048 images (``projects/ImageTower/configs/shapes.yaml`` into
``<output-dir>/image_tower``; ``--swin-weights`` or a file already there is reused). The coarse
checkpoint is ``--coarse-weights``, else ``<output-dir>/coarse/model_final.pth`` when present, else it
is trained here from that tower (``configs/Demo/coarse_tiny_vl.yaml``). ``--ablation`` also runs every
task from scratch (the paper's claim in miniature). Trailing ``KEY VALUE`` overrides apply to every
task; those that say where and how a run executes (:data:`RUN_KEYS`: ``MODEL.DEVICE``,
``SOLVER.AMP.ENABLED``, ``DATALOADER.NUM_WORKERS``) reach the image tower's and the coarse stage's
training too, so ``MODEL.DEVICE cuda`` runs every stage on the GPU. Results: stdout, ``<output-dir>/summary.{json,md}``, ``<output-dir>/<task>/pictures/*.png``.

A finished image tower or coarse stage is always reused (finished: its ``model_final.pth`` is the
last checkpoint its run saved and ``results.json`` was written after it, so neither a final whose
evaluation was killed nor an earlier run's files count). ``--resume`` continues an interrupted run: the
stage that was training resumes from its last checkpoint (``--resume`` of its ``train_net.py``), and a
task whose ``<output-dir>/<task>/result.json`` records the same coarse checkpoint and overrides is not
run again (a task interrupted part-way runs again: it has no checkpoints in between).

A task is one line of :data:`RUNNERS`: (name, project folder, module); the module's
``run(coarse_weights, output_dir) -> dict`` (see fiber_d2.engine.shapes_demo; an optional ``opts``
keyword receives the trailing overrides) does the work.
"""

from __future__ import annotations

import fiber_d2  # noqa: F401  # isort: skip  (imported first: registers FIBER, quiets fvcore)

import argparse
import importlib
import inspect
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from fiber_d2.checkpoint import run_finished
from fiber_d2.checkpoint.safe_io import write_whole
from fiber_d2.engine.cli import check_output_dir, run_child
from fiber_d2.engine.setup import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TRAIN_NET = ROOT / "tools" / "train_net.py"
COARSE_CONFIG = ROOT / "configs" / "Demo" / "coarse_tiny_vl.yaml"
TOWER_TRAIN_NET = ROOT / "projects" / "ImageTower" / "train_net.py"
TOWER_CONFIG = ROOT / "projects" / "ImageTower" / "configs" / "shapes.yaml"

# (task name, project folder under projects/, runner module)
RUNNERS = [
    ("retrieval", "Retrieval", "retrieval.shapes_demo"),
    ("vqa", "VQA", "vqa.shapes_demo"),
    ("nlvr2", "NLVR2", "nlvr2.shapes_demo"),
    ("captioning", "Captioning", "captioning.shapes_demo"),
]

# Overrides that say where and how a run executes, not what it learns: besides every task they reach
# the image tower's and the coarse stage's training (the rest are the tasks' alone).
RUN_KEYS = ("MODEL.DEVICE", "SOLVER.AMP.ENABLED", "DATALOADER.NUM_WORKERS")

RESULT_FILE = "result.json"  # a finished task's row, in its output folder

logger = logging.getLogger("fiber_d2.demo_vl")


def _train(cmd: list[str], what: str, resume: bool = False) -> float:
    """Run ``[python, train_net.py, args...]`` in a subprocess (an error stops the demo); returns its
    seconds. ``resume``: continue from the last checkpoint in its OUTPUT_DIR, if any (``--resume``,
    placed before the trailing KEY VALUE overrides, which take everything after them)."""
    if resume:
        cmd = [*cmd[:2], "--resume", *cmd[2:]]
    start = time.perf_counter()
    logger.info("Training %s: %s", what, " ".join(cmd))
    try:
        run_child(cmd)  # it ends with this process
    except subprocess.CalledProcessError as e:
        log = Path(cmd[cmd.index("OUTPUT_DIR") + 1]) / "log.txt"
        sys.exit(
            f"error: training {what} failed (exit status {e.returncode}; its log: {log}); "
            "once the cause is fixed, --resume continues from its last checkpoint"
        )
    return time.perf_counter() - start


def run_overrides(opts: list[str]) -> list[str]:
    """The ``KEY VALUE`` pairs of ``opts`` whose key is one of :data:`RUN_KEYS`, in order."""
    return [x for k, v in zip(opts[0::2], opts[1::2]) if k in RUN_KEYS for x in (k, v)]


def image_tower_weights(
    explicit: str | None, output_dir: Path, resume: bool = False, opts: list[str] = ()
) -> tuple[str, float]:
    """(path of the pre-trained Swin tower, seconds spent training it here: 0 when reused);
    ``opts``: the demo's overrides (those of :data:`RUN_KEYS` apply)."""
    if explicit:
        if not os.path.isfile(explicit):
            sys.exit(f"error: --swin-weights file not found: {explicit}")
        return explicit, 0.0
    out = output_dir / "image_tower"
    final = out / "swin_weights.pth"
    if final.is_file() and run_finished(str(out)):  # exported by a run that finished
        logger.info("Reusing %s", final)
        return str(final), 0.0
    cmd = [sys.executable, str(TOWER_TRAIN_NET), "--config-file", str(TOWER_CONFIG)]
    cmd += run_overrides(list(opts)) + ["OUTPUT_DIR", str(out)]
    seconds = _train(cmd, "the image tower", resume)
    return str(final), seconds


def coarse_checkpoint(
    explicit: str | None,
    swin_weights: str | None,
    output_dir: Path,
    resume: bool = False,
    opts: list[str] = (),
) -> tuple[str, float, float]:
    """(path of the coarse checkpoint, seconds spent on the image tower and on the coarse stage
    here: 0 when reused); ``opts``: the demo's overrides (those of :data:`RUN_KEYS` apply)."""
    if explicit:
        if not os.path.isfile(explicit):
            sys.exit(f"error: --coarse-weights file not found: {explicit}")
        return explicit, 0.0, 0.0
    out = output_dir / "coarse"
    final = out / "model_final.pth"
    if run_finished(str(out)):  # not an unevaluated final, nor an earlier run's
        logger.info("Reusing %s", final)
        return str(final), 0.0, 0.0
    tower, tower_seconds = image_tower_weights(swin_weights, output_dir, resume, opts)
    cmd = [sys.executable, str(TRAIN_NET), "--config-file", str(COARSE_CONFIG)]
    cmd += ["MODEL.SWIN.WEIGHTS", tower, *run_overrides(list(opts)), "OUTPUT_DIR", str(out)]
    return str(final), tower_seconds, _train(cmd, "the coarse stage", resume)


def _finished_row(done: Path, ran_with: dict) -> dict | None:
    """The row recorded in ``done`` (a task's result.json) when it ran with ``ran_with``, else None."""
    if not done.is_file():
        return None
    try:
        record = json.loads(done.read_text())
        same = {k: record.get(k) for k in ran_with} == ran_with and "row" in record
    except (ValueError, AttributeError) as e:  # not json / not an object
        logger.warning("%s is not a result record (%s); running the task again", done, e)
        return None
    if not same:
        logger.info("%s is from other weights or overrides; running the task again", done)
        return None
    logger.info("Reusing the finished task's result %s", done)
    return record["row"]


def run_task(run, coarse_weights: str | None, output_dir: Path, opts: tuple, resume: bool) -> dict:
    """The row of one runner; written to ``output_dir/result.json`` with the coarse checkpoint and the
    overrides it ran with. ``resume``: a row recorded with the same two is read back, not run again.
    """
    done = output_dir / RESULT_FILE
    ran_with = {"coarse_weights": coarse_weights, "opts": list(opts)}
    row = _finished_row(done, ran_with) if resume else None
    if row is not None:
        return row
    # runners take (coarse_weights, output_dir); overrides go to those that accept ``opts``
    kwargs = {"opts": tuple(opts)} if "opts" in inspect.signature(run).parameters else {}
    row = run(coarse_weights, output_dir, **kwargs)
    from fiber_d2.data.shapes import write_json  # atomic: a kill while writing leaves no half file

    output_dir.mkdir(parents=True, exist_ok=True)
    write_json(done, {**ran_with, "row": row}, indent=2)
    return row


def load_runner(project: str, module: str):
    """The ``run`` function of ``projects/<project>/<module>``."""
    path = str(ROOT / "projects" / project)
    if path not in sys.path:
        sys.path.insert(0, path)
    return importlib.import_module(module).run


def summary_table(rows: list[dict], ablation: bool) -> str:
    """A markdown table: task, metric, with coarse, [from scratch], baseline, minutes."""
    head = ["task", "metric", "coarse -> task"] + (["scratch -> task"] if ablation else [])
    head += ["trivial baselines", "minutes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["task"], r["metric"], f"{r['value']:.2f}"]
        if ablation:
            scratch = r.get("scratch")
            cells.append(f"{scratch['value']:.2f}" if scratch else "n/a")
        baselines = [f"{r['baseline']:.2f} ({r.get('baseline_name', '')})"]
        baselines += [f"{v:.2f} ({k})" for k, v in r.get("other_baselines", {}).items()]
        cells += ["; ".join(baselines), f"{r['seconds'] / 60:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def breakdown_tables(rows: list[dict], ablation: bool) -> str:
    """Markdown tables of the rows that carry a ``breakdown`` (the metric by part of the test set
    beside a baseline, e.g. VQA accuracy by question type beside the answer prior); "" if none."""
    tables = []
    for r in rows:
        b = r.get("breakdown")
        if not b:
            continue
        scratch = (r.get("scratch") or {}).get("breakdown", {}).get("rows", {})
        head = [b["by"], "coarse -> task"] + (["scratch -> task"] if ablation else [])
        head.append(b["baseline_name"])
        lines = [f"{r['task']} {r['metric']} by {b['by']}:", ""]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for part, cell in b["rows"].items():
            cells = [part, f"{cell['value']:.2f}"]
            if ablation:
                cells.append(f"{scratch[part]['value']:.2f}" if part in scratch else "n/a")
            cells.append(f"{cell['baseline']:.2f}")
            lines.append("| " + " | ".join(cells) + " |")
        tables.append("\n".join(lines))
    return "".join("\n\n" + t for t in tables)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output-dir", default="output/demo_vl")
    p.add_argument("--coarse-weights", default=None, help="a FIBERCoarse checkpoint to start from")
    p.add_argument("--swin-weights", default=None, help="a pre-trained image tower (Swin layout)")
    p.add_argument("--ablation", action="store_true", help="also run every task from scratch")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run (the training stage from its last checkpoint, finished "
        "tasks not repeated)",
    )
    p.add_argument(
        "--tasks", default=",".join(n for n, _, _ in RUNNERS), help="comma-separated task names"
    )
    p.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        help=f"KEY VALUE overrides for every task; of them, only {', '.join(RUN_KEYS)} also reach "
        "the image tower's and the coarse stage's training",
    )
    args = p.parse_args(argv)
    args.tasks = [t for t in args.tasks.split(",") if t]
    unknown = set(args.tasks) - {name for name, _, _ in RUNNERS}
    if unknown:
        sys.exit(f"error: unknown --tasks {sorted(unknown)}; known: {[n for n, _, _ in RUNNERS]}")

    from detectron2.utils.logger import setup_logger

    output_dir = Path(args.output_dir)
    try:
        check_output_dir(str(output_dir), "--output-dir")
    except ConfigError as e:
        sys.exit(f"error: {e}")
    for name in ("fiber_d2", "vqa", "nlvr2", "retrieval", "captioning", "image_tower"):
        setup_logger(str(output_dir), name=name, abbrev_name=name)
    setup_logger(str(output_dir))  # detectron2's own
    start = time.perf_counter()
    weights, tower_seconds, coarse_seconds = coarse_checkpoint(
        args.coarse_weights, args.swin_weights, output_dir, args.resume, args.opts
    )
    rows = []
    for name, project, module in RUNNERS:
        if name not in args.tasks:
            continue
        run = load_runner(project, module)
        row = run_task(run, weights, output_dir / name, args.opts, args.resume)
        if args.ablation:
            row["scratch"] = run_task(
                run, None, output_dir / f"{name}_scratch", args.opts, args.resume
            )
        rows.append(row)
    total = time.perf_counter() - start
    table = summary_table(rows, args.ablation) + breakdown_tables(rows, args.ablation)
    summary = {
        "coarse_weights": weights,
        "image_tower_seconds": tower_seconds,
        "coarse_seconds": coarse_seconds,
        "total_seconds": total,
        "tasks": rows,
    }
    with write_whole(str(output_dir / "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    footer = (
        f"\nimage tower: {tower_seconds / 60:.1f} min; coarse stage: {coarse_seconds / 60:.1f} min; "
        f"total: {total / 60:.1f} min\n"
    )
    with write_whole(str(output_dir / "summary.md"), "w") as f:
        f.write(table + "\n" + footer)
    print(table + footer)
    return summary


if __name__ == "__main__":
    main()
