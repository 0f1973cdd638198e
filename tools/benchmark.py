#!/usr/bin/env python
"""Time fiber_d2 models on synthetic inputs and print ONE JSON line.

    python tools/benchmark.py --config-file configs/FIBER-B/coco.yaml --task train --iters 1 \\
        --warmup 0
    python tools/benchmark.py --config-file configs/Demo/coarse_tiny.yaml --task train --batch 2
    python tools/benchmark.py --config-file configs/Demo/fine_tiny.yaml --task inference --amp
    python tools/benchmark.py --config-file configs/FIBER-B/coco.yaml --task train --reference
    python tools/benchmark.py --config-file configs/FIBER-B/coco.yaml --task train-fwd-bwd \\
        --iters 1 --warmup 0 --threads 1

Tasks (``TASKS``; their code, the synthetic inputs and the memory / time probes live in
:mod:`fiber_d2.benchmark`, this script is the command line):

* ``train``: one full training iteration of the configured meta-architecture (``FIBER`` or
  ``FIBERCoarse``): forward, sum of the losses, backward, optimizer step (``build_fiber_optimizer``:
  FIBER's parameter groups and clipping), EMA update with ``SOLVER.EMA.ENABLED``; fp16 adds a
  ``GradScaler`` as detectron2's AMPTrainer does. Extra keys ``{fwd,bwd,step}_ms_median``, ``loss``,
  ``fwd_bwd_peak_mem_mb`` (the peak up to the end of the backward passes: with --iters 1 --warmup 0
  the model, its EMA copy, its gradients and the activations, before the AdamW states exist),
  ``ema_mb`` (the size of the EMA copy, which exists before the first forward).
* ``train-fwd-bwd``: forward, sum of the losses and backward only (no optimizer, no EMA copy): the
  "train fwd+bwd" setting in which FIBER-B's training memory is compared with the original
  implementation's (``peak_mem_mb``: the model, its gradients and the activations). Extra keys
  ``{fwd,bwd}_ms_median``, ``loss``, ``trainable_params``.
* Both training tasks break the memory down (last iteration): ``params_mb`` and ``grads_mb`` (the
  parameters and their gradients), ``saved_activations_mb`` (tensors the forward saved for the
  backward, each storage once, parameters excluded), ``fwd_peak_mem_mb`` / ``after_fwd_mem_mb``
  (peak and current memory at the end of the forward) and ``after_bwd_mem_mb`` (current memory after
  the backward; on the CPU, what exceeds the live tensors there is freed heap that the allocator
  keeps resident, see ``--mmap-threshold-mb``).
* ``inference``: ``model.eval()`` forward (detector: detections incl. post-processing; coarse: image
  embeddings and those of 5 captions per image). Extra key ``outputs`` (detections / embeddings).
* ``export``: exports the detector to ONNX and TorchScript (``fiber_d2.deploy``) and times
  onnxruntime and the TorchScript module against eager on the same batch (backbone, head and
  post-processing); extra key ``runtimes`` (see :func:`~fiber_d2.benchmark.tasks.bench_export`).
* ``caption``: caption decoding of ``projects/Captioning``'s ``FIBERCaption`` with a key/value
  cache vs re-encoding the prefix every step (:func:`~fiber_d2.benchmark.tasks.bench_caption`);
  extra keys ``reencode_ms_median``, ``speedup``, ``image_ms_median``.
* ``backbone``: the fused backbone with its FPN; ``ms_median`` is the eval forward; extra keys
  ``fwd_peak_mem_mb`` (the peak up to the end of the eval forwards: the inference peak),
  ``fwd_bwd_ms_median`` (train mode, backward of a scalar of every output) and ``tokens_per_s``.
* ``lvis-eval``: detector inference of one image with a vocabulary of --names category names (LVIS:
  1203) in prompt chunks of --chunk names (``TEST.CHUNKED_EVALUATION``, LVIS: 40), as LVIS
  evaluation and ``FIBERPredictor`` run long vocabularies. Extra keys ``chunks``, ``outputs``.

``--reference`` runs the task twice, each time in a fresh process (in one process the first run
would pay the first-call costs and the second inherit the first's heap): first with the performance
features switched off (``fiber_d2.benchmark.REFERENCE_OVERRIDES``: text padded to ``MAX_QUERY_LEN``,
the CPU deformable conv keeping its samples, the fused text layers' cross-attention kept for the
backward pass, timm's matmul + softmax Swin window attention in inference, chunked prompts through
the whole model one by one), then as configured, and prints three JSON lines: the two records
(``variant`` "reference" / "improved") and their comparison
(``variant`` "ratio": ``speedup`` = reference ms / improved ms, ``peak_mem_ratio`` and, where the
task reports ``fwd_peak_mem_mb``, ``fwd_peak_mem_ratio`` = improved / reference). On a busy machine
compare only these ratios.

Every record has ``task``, ``config``, ``device``, ``device_name``, ``threads``, ``dtype`` (float32,
or the autocast dtype: ``--amp`` means fp16 on CUDA and bf16 on the CPU, ``--amp-dtype`` chooses),
``height``/``width`` (padded to the size divisibility), ``batch``, ``iters``, ``warmup``,
``ms_median``, ``images_per_s``, ``peak_mem_mb``, ``params`` (all, frozen included) and, for
reference runs, ``target_ms``/``within_target`` (``SPEED_TARGETS_MS``). ``peak_mem_mb`` spans model
construction and the runs: ``torch.cuda.max_memory_allocated`` on a GPU; on the CPU the growth of
the peak resident set size after ``malloc_trim`` (Linux ``VmHWM``, reset via
``/proc/self/clear_refs`` so each run in a process has its own peak; ``getrusage`` elsewhere). On a
shared CPU use ``--threads 1``: two busy intra-op threads on two contended cores can run 50x slower.
As ``tools/train_net.py`` does for training, the training tasks fix glibc's mmap threshold at
``CPU_MMAP_THRESHOLD_MB`` (default 8 MiB; :mod:`fiber_d2.engine.memory`) unless
``MALLOC_MMAP_THRESHOLD_`` is set: freed tensors then leave the resident set at once instead of
staying as heap gaps, which cuts the CPU training peak by about 1 GB at 800 x 1333 (for 1.14x the
time). ``--mmap-threshold-mb N`` sets another threshold,
``--mmap-threshold-mb 0`` keeps glibc's dynamic default (128 KiB growing up to 32 MiB). It is one
setting per process, so ``--reference`` runs both variants with it. Every record has
``mmap_threshold_mb`` (None: glibc's default).

Synthetic inputs follow the mappers' output contract (``fiber_d2/data/mapper.py``). Detector: uint8
``image`` (3, H, W), H x W = ``MIN_SIZE_TEST`` x ``MAX_SIZE_TEST`` (FIBER-B: 800 x 1333, run at
800 x 1344) unless --height/--width; ``input_ids``/``attention_mask`` (T = ``MAX_QUERY_LEN``)
holding a prompt of ``DYHEAD.NUM_CLASSES - 1`` labels (COCO: 80; two tokens and a separator each,
as many as fit); ``label_token_map`` (L, T); for training ``instances`` with --boxes random
``gt_boxes``, ``gt_classes``, ``gt_positive_map`` (G, T). Coarse: uint8 ``image`` (3, S, S),
S = ``INPUT.IMAGE_SIZE`` (the caption mapper's square resize); a caption filling 3/4 of T;
``mlm_input_ids``/``mlm_labels`` from ``mask_tokens_for_mlm``. ITM draws hard negatives from the
batch and the queue; with ``MODEL.COARSE.ITM_NEGATIVES batch`` (the batch only) coarse training needs
--batch >= 2.

Weights are random (tower ``WEIGHTS`` are never loaded) unless ``MODEL.WEIGHTS`` is a local file;
with random weights few detections pass the score threshold, so NMS costs less than when trained.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys

import torch
from detectron2.config import CfgNode

from fiber_d2.benchmark import (
    REFERENCE_OVERRIDES,
    bench_backbone,
    bench_caption,
    bench_export,
    bench_inference,
    bench_lvis_eval,
    bench_train,
    bench_train_fwd_bwd,
    reference_cfg,
)
from fiber_d2.checkpoint.safe_io import one_line
from fiber_d2.engine.cli import run_tied
from fiber_d2.engine.memory import apply_mmap_threshold, check_mmap_threshold, mmap_threshold_mb
from fiber_d2.engine.setup import ConfigError, is_out_of_memory, load_config
from fiber_d2.engine.trainer import is_coarse_stage

__all__ = ["SPEED_TARGETS_MS", "TASKS", "main", "setup_cfg"]

# Speed targets (ms_median) of reference runs: CPU, --threads 1, fp32, the config's default size,
# no overrides; keyed by (config file name, task, batch). Set from runs on a shared 2-core CPU
# (torch 2.14, 2026-11) with about 2x headroom for machine noise; `--check` exits 1 when a run
# misses its target. Tests never assert speed: this table is the only place where it is judged.
SPEED_TARGETS_MS: dict[tuple[str, str, int], float] = {
    ("fine_tiny.yaml", "train", 1): 400.0,  # measured 166 ms (fwd 67, bwd 75, step 23), 160 x 256
    ("fine_tiny.yaml", "inference", 1): 120.0,  # measured 52 ms
    ("fine_tiny.yaml", "backbone", 1): 80.0,  # measured 31 ms
    ("coarse_tiny.yaml", "train", 2): 600.0,  # measured 256 ms, 128 x 128
    ("coarse_tiny.yaml", "inference", 1): 40.0,  # measured 14 ms
    ("coco.yaml", "train", 1): 320000.0,  # measured 156 s (--iters 1 --warmup 0), 800 x 1344
    ("coco.yaml", "inference", 1): 120000.0,  # measured 53 s (--iters 1 --warmup 0)
}


def setup_cfg(args: argparse.Namespace) -> CfgNode:
    """Config of a run: defaults + file + overrides, on ``args.device``, with random towers.

    Raises:
        ConfigError: missing file, unknown key, malformed override or missing ``MODEL.WEIGHTS``.
    """
    cfg = load_config(args.config_file, args.opts)
    cfg.MODEL.DEVICE = args.device
    # Speed does not depend on the pretrained tower weights: never fetch them.
    cfg.MODEL.LANGUAGE_BACKBONE.WEIGHTS = ""
    cfg.MODEL.SWIN.WEIGHTS = ""
    height, width = args.height or args.width, args.width or args.height
    if is_coarse_stage(cfg) and height and height == width:
        # the caption mapper's square size (the ITM input queue holds images of it)
        cfg.INPUT.IMAGE_SIZE = height
    if cfg.MODEL.WEIGHTS and not os.path.isfile(cfg.MODEL.WEIGHTS):
        raise ConfigError(f"MODEL.WEIGHTS file not found: {cfg.MODEL.WEIGHTS} (local files only)")
    cfg.freeze()
    return cfg


TASKS = {
    "backbone": bench_backbone,
    "export": bench_export,
    "inference": bench_inference,
    "caption": bench_caption,
    "lvis-eval": bench_lvis_eval,
    "train": bench_train,
    "train-fwd-bwd": bench_train_fwd_bwd,
}


# ------------------------------------------------------------------------------------ CLI
def _parser() -> argparse.ArgumentParser:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config-file", default="", help="yaml config (defaults are FIBER-B)")
    p.add_argument("--task", default="train", choices=sorted(TASKS))
    p.add_argument("--height", type=int, default=None, help="image height (MIN_SIZE_TEST)")
    p.add_argument("--width", type=int, default=None, help="image width (MAX_SIZE_TEST)")
    p.add_argument("--batch", type=int, default=1, help="images per iteration")
    p.add_argument("--boxes", type=int, default=8, help="ground-truth boxes per training image")
    p.add_argument("--iters", type=int, default=5, help="timed iterations")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations before them")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if cuda else "cpu")
    p.add_argument(
        "--threads", type=int, default=None, help="CPU intra-op threads (torch's default)"
    )
    p.add_argument("--amp", action="store_true", help="autocast: fp16 on CUDA, bf16 on the CPU")
    p.add_argument("--amp-dtype", choices=["bf16", "fp16"], help="autocast dtype (fp16: CUDA only)")
    p.add_argument("--check", action="store_true", help="exit 1 when slower than SPEED_TARGETS_MS")
    p.add_argument(
        "--reference",
        action="store_true",
        help="run with REFERENCE_OVERRIDES (features off) and as configured, each in a fresh "
        "process; print both and their ratio",
    )
    p.add_argument(
        "--variant",
        choices=["reference", "improved"],
        default=None,
        help=argparse.SUPPRESS,  # one side of --reference (REFERENCE_OVERRIDES applied or not)
    )
    p.add_argument(
        "--mmap-threshold-mb",
        type=float,
        default=None,
        help="glibc: allocations of at least this many MiB get their own mmap; 0: glibc's default "
        "(default: CPU_MMAP_THRESHOLD_MB of the config)",
    )
    p.add_argument("--names", type=int, default=1203, help="lvis-eval: vocabulary size")
    p.add_argument("--chunk", type=int, default=40, help="lvis-eval: names per prompt chunk")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return p


def _target(args: argparse.Namespace) -> float | None:
    """The speed target of this run, if it is a reference run (see ``SPEED_TARGETS_MS``)."""
    if args.height or args.width or args.amp or args.amp_dtype or args.opts:
        return None
    if args.reference or args.variant:  # a side of a comparison, not a target run
        return None
    if args.mmap_threshold_mb is not None:
        return None
    if args.device != "cpu" or torch.get_num_threads() != 1:
        return None
    return SPEED_TARGETS_MS.get((os.path.basename(args.config_file), args.task, args.batch))


def main(argv: list[str] | None = None) -> dict:
    """Parse the command line, run the task, print and return its JSON record (with
    ``--reference``: {"reference", "improved", "ratio"} records).

    A bad command line or config ends the process with one ``error: ...`` line (exit status 2 from
    argparse, 1 otherwise); with ``--check``, a run slower than its target exits 1 after printing.
    """
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        if min(args.iters, args.batch, args.boxes, args.threads or 1) < 1 or args.warmup < 0:
            raise ValueError(
                "need --iters, --batch, --boxes, --threads >= 1 and --warmup >= 0; got "
                f"{args.iters}, {args.batch}, {args.boxes}, {args.threads}, {args.warmup}"
            )
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available")
        if args.mmap_threshold_mb is not None:
            check_mmap_threshold(args.mmap_threshold_mb, "--mmap-threshold-mb")
        if min(args.names, args.chunk) < 1:
            raise ValueError(f"need --names, --chunk >= 1; got {args.names}, {args.chunk}")
        if args.threads:
            torch.set_num_threads(args.threads)
        cfg = setup_cfg(args)
        # as tools/train_net.py: CPU_MMAP_THRESHOLD_MB for training, unless the flag says otherwise
        # (any task; 0: glibc's dynamic default)
        if args.mmap_threshold_mb is not None:
            apply_mmap_threshold(args.mmap_threshold_mb)
        elif args.task in ("train", "train-fwd-bwd"):
            apply_mmap_threshold(cfg.CPU_MMAP_THRESHOLD_MB)
        if args.reference:
            argv = list(sys.argv[1:] if argv is None else argv)
            argv.remove("--reference")
            ref, new = (_run_variant(argv, variant) for variant in ("reference", "improved"))
            ratio = {k: ref[k] for k in ("task", "config", "device", "threads", "dtype")}
            ratio.update(height=ref["height"], width=ref["width"], batch=args.batch)
            ratio.update(variant="ratio", speedup=round(ref["ms_median"] / new["ms_median"], 3))
            for key in ("peak_mem_mb", "fwd_peak_mem_mb"):
                if key in ref and key in new:
                    name = key.replace("_mb", "_ratio")
                    ratio[name] = round(new[key] / max(ref[key], 1e-9), 3)
            ratio["overrides"] = dict(REFERENCE_OVERRIDES)
            print(json.dumps(ratio), flush=True)
            return {"reference": ref, "improved": new, "ratio": ratio}
        if args.variant:
            run_cfg = reference_cfg(cfg) if args.variant == "reference" else cfg
            return _finish(args, cfg, TASKS[args.task](run_cfg, args), args.variant)
        result = TASKS[args.task](cfg, args)
    except (ConfigError, ValueError, KeyError) as e:
        sys.exit(f"error: {e}")
    except RuntimeError as e:
        if not is_out_of_memory(e):
            raise
        sys.exit(f"error: --task {args.task} at batch {args.batch}: out of memory: {one_line(e)}")
    return _finish(args, cfg, result)


def _run_variant(argv: list[str], variant: str) -> dict:
    """Run one side of ``--reference`` in a fresh process; print and return its record.

    A fresh process per side keeps the comparison fair: in one process the first run pays the
    process's first-call costs and the second inherits the first's heap.
    """
    cmd = [sys.executable, os.path.abspath(__file__), "--variant", variant, *argv]
    proc = run_tied(cmd, stdout=subprocess.PIPE, text=True)  # ends if this run is killed
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"error: the {variant} run failed (exit status {proc.returncode})")
    print(lines[-1], flush=True)
    return json.loads(lines[-1])


def _finish(args: argparse.Namespace, cfg: CfgNode, result: dict, variant: str = "") -> dict:
    """Complete, print and return the JSON record of one run (``--check`` may exit 1)."""
    ms = result.pop("ms_median")
    name = torch.cuda.get_device_name(args.device) if args.device == "cuda" else "cpu"
    record = dict(task=args.task, config=args.config_file or "defaults", device=args.device)
    record.update(device_name=name, threads=torch.get_num_threads(), dtype=result.pop("dtype"))
    record.update(height=result.pop("height"), width=result.pop("width"), batch=args.batch)
    record.update(iters=args.iters, warmup=args.warmup, ms_median=ms)
    record.update(images_per_s=round(args.batch / (ms / 1000.0), 3), **result)
    record.update(meta_architecture=cfg.MODEL.META_ARCHITECTURE)
    record.update(mmap_threshold_mb=mmap_threshold_mb())
    if variant:
        record["variant"] = variant
    target = _target(args)
    if target is not None:
        record.update(target_ms=target, within_target=ms <= target)
    print(json.dumps(record), flush=True)
    if args.check and target is not None and ms > target:
        sys.exit(1)
    return record


if __name__ == "__main__":
    main(sys.argv[1:])
