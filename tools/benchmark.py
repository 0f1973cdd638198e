#!/usr/bin/env python
"""Time fiber_d2 models on synthetic inputs and print ONE JSON line.

    python tools/benchmark.py --config-file configs/FIBER-B/coco.yaml --task train --iters 1 \\
        --warmup 0
    python tools/benchmark.py --config-file configs/Demo/coarse_tiny.yaml --task train --batch 2
    python tools/benchmark.py --config-file configs/Demo/fine_tiny.yaml --task inference --amp
    python tools/benchmark.py --config-file configs/FIBER-B/coco.yaml --task train --reference
    python tools/benchmark.py --config-file configs/FIBER-B/coco.yaml --task train-fwd-bwd \\
        --iters 1 --warmup 0 --threads 1

Tasks (``TASKS``):

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
  onnxruntime and the TorchScript module against eager on the same batch (backbone, head and post-processing); extra key
  ``runtimes`` (see :func:`bench_export`).
* ``caption``: caption decoding of ``projects/Captioning``'s ``FIBERCaption`` with a key/value
  cache vs re-encoding the prefix every step (:func:`bench_caption`); extra keys
  ``reencode_ms_median``, ``speedup``, ``image_ms_median``.
* ``backbone``: the fused backbone with its FPN; ``ms_median`` is the eval forward; extra keys
  ``fwd_bwd_ms_median`` (train mode, backward of a scalar of every output) and ``tokens_per_s``.
* ``lvis-eval``: detector inference of one image with a vocabulary of --names category names (LVIS:
  1203) in prompt chunks of --chunk names (``TEST.CHUNKED_EVALUATION``, LVIS: 40), as LVIS
  evaluation and ``FIBERPredictor`` run long vocabularies. Extra keys ``chunks``, ``outputs``.

``--reference`` runs the task twice in one process, first with the performance features switched
off (``REFERENCE_OVERRIDES``: text padded to ``MAX_QUERY_LEN``, the CPU deformable conv keeping its
samples, the fused text layers' cross-attention kept for the backward pass, chunked prompts through
the whole model one by one), then as configured, and prints three JSON lines: the two records
(``variant`` "reference" / "improved") and their comparison (``variant`` "ratio": ``speedup`` =
reference ms / improved ms, ``peak_mem_ratio`` = improved / reference). On a busy machine compare
only these ratios.

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
batch: coarse training needs --batch >= 2.

Weights are random (tower ``WEIGHTS`` are never loaded) unless ``MODEL.WEIGHTS`` is a local file;
with random weights few detections pass the score threshold, so NMS costs less than when trained.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import functools
import gc
import json
import logging
import math
import os
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone, build_model
from detectron2.structures import Boxes, Instances

import fiber_d2  # noqa: F401  (registers the meta-architectures)
from fiber_d2.engine.hooks import ModelEMA
from fiber_d2.engine.memory import apply_mmap_threshold, mmap_threshold_mb
from fiber_d2.engine.optimizer import build_fiber_optimizer
from fiber_d2.engine.setup import ConfigError, load_config, tool_image_size
from fiber_d2.engine.trainer import is_coarse_stage
from fiber_d2.text import mask_tokens_for_mlm

__all__ = [
    "REFERENCE_OVERRIDES",
    "SPEED_TARGETS_MS",
    "TASKS",
    "PeakMemory",
    "bench_export",
    "chunked_prompts",
    "coarse_batch",
    "detector_batch",
    "main",
]

logger = logging.getLogger("fiber_d2.benchmark")

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

# --reference: the performance features switched off (each gives the same outputs on its own)
REFERENCE_OVERRIDES = {
    "INPUT.PAD_TO_MAX_QUERY_LEN": True,
    "MODEL.DYHEAD.DFCONV_RECOMPUTE": False,
    "MODEL.LANGUAGE_BACKBONE.CHECKPOINT_CROSS_ATTENTION": False,
    "TEST.PREFIX_REUSE": False,
}

_EVAL_CAPTIONS_PER_IMAGE = 5  # COCO / Flickr30k retrieval: 5 captions per image
_FIRST_WORD_ID = 5  # ids 0-4 are <s>, <pad>, </s>, <unk>, <mask> in RoBERTa-style vocabularies
_BOS_ID, _EOS_ID, _MASK_ID = 0, 2, 4


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
    if cfg.MODEL.WEIGHTS and not os.path.isfile(cfg.MODEL.WEIGHTS):
        raise ConfigError(f"MODEL.WEIGHTS file not found: {cfg.MODEL.WEIGHTS} (local files only)")
    cfg.freeze()
    return cfg


# ------------------------------------------------------------------------------------ measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_kb(field: str) -> int | None:
    """A ``/proc/self/status`` size field (``VmRSS``, ``VmHWM``) in KiB; None where unavailable."""
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+)", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


class PeakMemory:
    """Peak memory of a span of work in MiB (see the module docstring).

    Args:
        device: where the work runs.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._start_kb = 0
        self._hwm = False

    def start(self) -> None:
        """Begin the span (before the model is built)."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:  # hand freed heap pages back to the OS, so that reusing them shows as growth
            ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM (peak RSS) to the current RSS
            rss = _proc_status_kb("VmRSS")
            self._hwm = rss is not None and _proc_status_kb("VmHWM") is not None
        except OSError:
            self._hwm = False
        self._start_kb = rss if self._hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def peak_mb(self) -> float:
        """CUDA max allocated, or CPU peak-RSS growth, since :meth:`start`."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self._hwm:
            end = _proc_status_kb("VmHWM") or self._start_kb
        else:
            end = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return max(end - self._start_kb, 0) / 1024.0

    def current_mb(self) -> float | None:
        """CUDA allocated, or CPU resident-set growth, now; None where unavailable."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**20
        rss = _proc_status_kb("VmRSS") if self._hwm else None
        return None if rss is None else max(rss - self._start_kb, 0) / 1024.0


class SavedTensors(AbstractContextManager):
    """Bytes of the tensors autograd saves for the backward pass inside the context (each storage
    once; parameters excluded), e.g. the activations a training forward keeps.

    Args:
        model: the module whose parameters are not counted.
    """

    def __init__(self, model: torch.nn.Module):
        self._skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self._sizes: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self._skip:
            self._sizes.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    def __enter__(self) -> SavedTensors:
        self._sizes.clear()
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def mb(self) -> float:
        """MiB saved during the last ``with`` block."""
        return sum(self._sizes.values()) / 2**20


def _timed(fn: Callable[[], dict | None], device: torch.device, iters: int, warmup: int) -> dict:
    """Run ``fn`` ``warmup`` times untimed, then ``iters`` times timed.

    Returns:
        ``{"total": [ms per call], <phase>: [ms]}`` with the phase durations ``fn`` returns.
    """
    for _ in range(warmup):
        fn()
    times: dict[str, list[float]] = {"total": []}
    for _ in range(iters):
        _sync(device)
        start = time.perf_counter()
        phases = fn() or {}
        _sync(device)
        times["total"].append((time.perf_counter() - start) * 1000.0)
        for k, v in phases.items():
            times.setdefault(k, []).append(v)
    return times


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 2)


def _autocast(device: torch.device, args: argparse.Namespace) -> tuple[AbstractContextManager, str]:
    """(autocast context, dtype name) for ``--amp`` / ``--amp-dtype``."""
    if not (args.amp or args.amp_dtype):
        return nullcontext(), "float32"
    amp = args.amp_dtype or ("fp16" if device.type == "cuda" else "bf16")
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp-dtype fp16 needs --device cuda; use bf16 on the CPU")
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype), str(dtype).replace("torch.", "")


def _padded(size: int, div: int) -> int:
    return int(math.ceil(size / max(div, 1)) * max(div, 1))


# ------------------------------------------------------------------------------------ inputs
def reference_cfg(cfg: CfgNode) -> CfgNode:
    """``cfg`` with ``REFERENCE_OVERRIDES`` applied (frozen)."""
    ref = cfg.clone()
    ref.defrost()
    ref.merge_from_list([x for kv in REFERENCE_OVERRIDES.items() for x in kv])
    ref.freeze()
    return ref


def _check_text(cfg: CfgNode) -> None:
    lb = cfg.MODEL.LANGUAGE_BACKBONE
    if lb.VOCAB_SIZE <= _FIRST_WORD_ID + 1 or lb.MAX_QUERY_LEN < 4:
        raise ValueError(
            "synthetic text needs MODEL.LANGUAGE_BACKBONE.VOCAB_SIZE > 6 and MAX_QUERY_LEN >= 4, "
            f"got {lb.VOCAB_SIZE} and {lb.MAX_QUERY_LEN}"
        )


def _prompt(cfg: CfgNode, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """A detection prompt ``<s> a b . c d . ... </s> <pad>...`` as the mapper tokenizes it.

    One label per class (``DYHEAD.NUM_CLASSES - 1``): two word tokens and a separator each, one
    word when two do not fit, and as many labels as fit.

    Returns:
        ``input_ids`` (T,), ``attention_mask`` (T,) and ``label_token_map`` (L, T) bool.
    """
    _check_text(cfg)
    lb = cfg.MODEL.LANGUAGE_BACKBONE
    length, room = lb.MAX_QUERY_LEN, lb.MAX_QUERY_LEN - 2  # room: all but <s> and </s>
    num_labels = max(cfg.MODEL.DYHEAD.NUM_CLASSES - 1, 1)
    span = 2 if 3 * num_labels <= room else 1
    num_labels = min(num_labels, room // (span + 1))
    ids = torch.full((length,), lb.PAD_TOKEN_ID, dtype=torch.long)
    label_map = torch.zeros(num_labels, length, dtype=torch.bool)
    ids[0], pos = _BOS_ID, 1
    for label in range(num_labels):
        words = torch.randint(_FIRST_WORD_ID + 1, lb.VOCAB_SIZE, (span,), generator=generator)
        ids[pos : pos + span] = words
        label_map[label, pos : pos + span] = True
        ids[pos + span] = _FIRST_WORD_ID  # the "." separator
        pos += span + 1
    ids[pos] = _EOS_ID
    return ids, (torch.arange(length) <= pos).long(), label_map


def detector_batch(
    cfg: CfgNode, batch: int, height: int, width: int, num_boxes: int, seed: int = 0
) -> list[dict]:
    """Synthetic ``GroundingDatasetMapper`` training outputs (without ``instances``: inference).

    Args:
        cfg: the config (text length, vocabulary, number of classes).
        batch: number of images B.
        height, width: image size H, W (already resized, as the mapper outputs it).
        num_boxes: ground-truth boxes G per image (sides 5-50 % of the image's).
        seed: RNG seed.

    Returns:
        B dicts with ``image`` uint8 (3, H, W), ``height``, ``width``, ``input_ids`` /
        ``attention_mask`` (T,), ``label_token_map`` (L, T) and ``instances`` (``gt_boxes`` (G, 4)
        xyxy, ``gt_classes`` (G,), ``gt_positive_map`` (G, T)).
    """
    g = torch.Generator().manual_seed(seed)
    wh = torch.tensor([float(width), float(height)])
    records = []
    for _ in range(batch):
        ids, mask, label_map = _prompt(cfg, g)
        classes = torch.randint(0, label_map.shape[0], (num_boxes,), generator=g)
        sides = (0.05 + 0.45 * torch.rand(num_boxes, 2, generator=g)) * wh
        corner = torch.rand(num_boxes, 2, generator=g) * (wh - sides)
        instances = Instances((height, width))
        instances.gt_boxes = Boxes(torch.cat([corner, corner + sides], dim=1))
        instances.gt_classes = classes
        instances.gt_positive_map = label_map[classes]
        image = torch.randint(0, 256, (3, height, width), generator=g, dtype=torch.uint8)
        records.append(
            dict(image=image, height=height, width=width, input_ids=ids, attention_mask=mask)
        )
        records[-1].update(label_token_map=label_map, instances=instances)
    return records


def chunked_prompts(
    cfg: CfgNode, num_names: int, chunk: int, generator: torch.Generator
) -> tuple[torch.Tensor, ...]:
    """A vocabulary of ``num_names`` names in prompts of ``chunk`` names, as LVIS evaluation
    tokenizes it: two word tokens and a separator per name, each chunk padded to T.

    Returns:
        ``input_ids`` / ``attention_mask`` (K, T) and ``label_token_map`` (K, chunk, T).
    """
    _check_text(cfg)
    lb = cfg.MODEL.LANGUAGE_BACKBONE
    length = lb.MAX_QUERY_LEN
    if 3 * chunk + 2 > length:
        raise ValueError(f"--chunk {chunk} names need {3 * chunk + 2} tokens > MAX_QUERY_LEN")
    num_chunks = -(-num_names // chunk)
    ids = torch.full((num_chunks, length), lb.PAD_TOKEN_ID, dtype=torch.long)
    label_map = torch.zeros(num_chunks, chunk, length, dtype=torch.bool)
    for k in range(num_chunks):
        ids[k, 0], pos = _BOS_ID, 1
        for label in range(min(chunk, num_names - k * chunk)):
            ids[k, pos : pos + 2] = torch.randint(
                _FIRST_WORD_ID + 1, lb.VOCAB_SIZE, (2,), generator=generator
            )
            label_map[k, label, pos : pos + 2] = True
            ids[k, pos + 2] = _FIRST_WORD_ID
            pos += 3
        ids[k, pos] = _EOS_ID
    return ids, (ids != lb.PAD_TOKEN_ID).long(), label_map


class _SyntheticVocab:
    """What :func:`mask_tokens_for_mlm` reads from a tokenizer, for a RoBERTa-style id layout."""

    def __init__(self, vocab_size: int, pad_id: int):
        self.mask_token_id = _MASK_ID
        self.all_special_ids = sorted({_BOS_ID, pad_id, _EOS_ID, 3, _MASK_ID})
        self.vocab_size = vocab_size

    def __len__(self) -> int:
        return self.vocab_size


def coarse_batch(
    cfg: CfgNode, batch: int, height: int, width: int, train: bool, seed: int = 0
) -> list[dict]:
    """Synthetic ``CaptionDatasetMapper`` outputs.

    Args:
        cfg: the config (text length, vocabulary, MLM probability).
        batch: number of images B.
        height, width: image size (the mapper gives S x S).
        train: one caption with MLM inputs per image, else 5 captions per image (evaluation).
        seed: RNG seed.

    Returns:
        B dicts with ``image`` uint8 (3, H, W), ``height``, ``width`` and ``input_ids`` /
        ``attention_mask`` (T,) plus ``mlm_input_ids`` / ``mlm_labels`` (T,) in training, or
        ``input_ids`` / ``attention_mask`` (5, T) for evaluation.
    """
    _check_text(cfg)
    lb = cfg.MODEL.LANGUAGE_BACKBONE
    length, vocab = lb.MAX_QUERY_LEN, lb.VOCAB_SIZE
    g = torch.Generator().manual_seed(seed)
    real = max(3, (3 * length) // 4)  # <s> caption </s>, then padding
    k = 1 if train else _EVAL_CAPTIONS_PER_IMAGE
    records = []
    for _ in range(batch):
        ids = torch.full((k, length), lb.PAD_TOKEN_ID, dtype=torch.long)
        ids[:, 0], ids[:, real - 1] = _BOS_ID, _EOS_ID
        ids[:, 1 : real - 1] = torch.randint(_FIRST_WORD_ID, vocab, (k, real - 2), generator=g)
        mask = (torch.arange(length) < real).long().repeat(k, 1)
        image = torch.randint(0, 256, (3, height, width), generator=g, dtype=torch.uint8)
        record = dict(image=image, height=height, width=width, input_ids=ids, attention_mask=mask)
        if train:
            record.update(input_ids=ids[0], attention_mask=mask[0])
            masked, labels = mask_tokens_for_mlm(
                ids[0], _SyntheticVocab(vocab, lb.PAD_TOKEN_ID), cfg.MODEL.COARSE.MLM_PROBABILITY, g
            )
            record.update(mlm_input_ids=masked, mlm_labels=labels)
        records.append(record)
    return records


def _input_size(cfg: CfgNode, args: argparse.Namespace) -> tuple[int, int]:
    """(H, W) of the synthetic images: --height/--width, else the configured test size."""
    return tool_image_size(cfg, args.height, args.width)


def _model_inputs(cfg: CfgNode, args: argparse.Namespace, train: bool) -> tuple[list, int, int]:
    """The synthetic batch and the (padded) size the model runs at."""
    height, width = _input_size(cfg, args)
    if is_coarse_stage(cfg):
        if train and "itm" in cfg.MODEL.COARSE.LOSSES and args.batch < 2:
            raise ValueError(
                f"coarse --task train with ITM needs --batch >= 2 (hard negatives come from the "
                f"batch), got --batch {args.batch}"
            )
        return coarse_batch(cfg, args.batch, height, width, train), height, width
    batch = detector_batch(cfg, args.batch, height, width, args.boxes)
    if not train:
        for record in batch:
            del record["instances"]
    div = cfg.INPUT.SIZE_DIVISIBILITY
    return batch, _padded(height, div), _padded(width, div)


def _build(cfg: CfgNode) -> torch.nn.Module:
    torch.manual_seed(max(cfg.SEED, 0))
    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        from fiber_d2.checkpoint.checkpointer import FIBERCheckpointer

        FIBERCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    return model


def _params(model: torch.nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def _record(size: tuple[int, int], dtype: str, ms: list[float], memory: PeakMemory, model) -> dict:
    """The keys every task reports."""
    h, w, mb = size[0], size[1], round(memory.peak_mb(), 1)
    record = dict(height=h, width=w, dtype=dtype, ms_median=_median(ms), peak_mem_mb=mb)
    return {**record, "params": _params(model)}


# ------------------------------------------------------------------------------------ tasks
def bench_train(cfg: CfgNode, args: argparse.Namespace, full: bool = True) -> dict:
    """Time training iterations: forward, losses, backward and, when ``full``, the optimizer step
    and the EMA update.

    Args:
        cfg: the config (meta-architecture ``FIBER`` or ``FIBERCoarse``).
        args: parsed command line.
        full: the whole iteration (task ``train``); False runs forward + backward only, without an
            optimizer or an EMA copy (task ``train-fwd-bwd``).

    Returns:
        the measurements (see the module docstring).
    """
    device = torch.device(args.device)
    autocast, dtype = _autocast(device, args)
    batch, height, width = _model_inputs(cfg, args, train=True)
    memory = PeakMemory(device)
    memory.start()
    model = _build(cfg).train()
    optimizer = build_fiber_optimizer(cfg, model) if full else None
    ema = ModelEMA(model, cfg.SOLVER.EMA.DECAY) if full and cfg.SOLVER.EMA.ENABLED else None
    scaler = torch.amp.GradScaler("cuda") if full and dtype == "float16" else None
    last_loss = [float("nan")]
    fwd_bwd_peak = [0.0]
    saved = SavedTensors(model)
    breakdown: dict[str, float | None] = {}

    def step() -> dict:
        t0 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        with autocast, saved:
            losses = model(batch)
        loss = sum(losses.values())
        _sync(device)
        t1 = time.perf_counter()
        breakdown.update(fwd_peak_mem_mb=memory.peak_mb(), after_fwd_mem_mb=memory.current_mb())
        (scaler.scale(loss) if scaler else loss).backward()
        _sync(device)
        t2 = time.perf_counter()
        fwd_bwd_peak[0] = max(fwd_bwd_peak[0], memory.peak_mb())
        breakdown.update(after_bwd_mem_mb=memory.current_mb(), saved_activations_mb=saved.mb)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        elif optimizer is not None:
            optimizer.step()
        if ema is not None:
            ema.update(model)
        last_loss[0] = float(loss.detach())  # synchronises
        t3 = time.perf_counter()
        return {"fwd": (t1 - t0) * 1e3, "bwd": (t2 - t1) * 1e3, "step": (t3 - t2) * 1e3}

    times = _timed(step, device, args.iters, args.warmup)
    if not math.isfinite(last_loss[0]):
        logger.warning("the training loss is not finite: %s", last_loss[0])
    phases = ("fwd", "bwd", "step") if full else ("fwd", "bwd")
    record = {
        **_record((height, width), dtype, times["total"], memory, model),
        **{f"{k}_ms_median": _median(times[k]) for k in phases},
        "trainable_params": _params(model, trainable=True),
        "loss": round(last_loss[0], 6),
        "params_mb": round(_state_mb(dict(model.named_parameters())), 1),
        "grads_mb": round(_state_mb({n: p.grad for n, p in model.named_parameters()}), 1),
        **{k: None if v is None else round(v, 1) for k, v in breakdown.items()},
    }
    if full:
        record["fwd_bwd_peak_mem_mb"] = round(fwd_bwd_peak[0], 1)
        record["ema"] = ema is not None
        record["ema_mb"] = round(_state_mb(ema.state) if ema is not None else 0.0, 1)
    return record


def bench_train_fwd_bwd(cfg: CfgNode, args: argparse.Namespace) -> dict:
    """Task ``train-fwd-bwd``: :func:`bench_train` without the optimizer and the EMA copy."""
    return bench_train(cfg, args, full=False)


def _state_mb(state: dict[str, torch.Tensor]) -> float:
    """Size of a state dict's tensors in MiB (None entries count 0)."""
    return sum(t.numel() * t.element_size() for t in state.values() if t is not None) / 2**20


def bench_inference(cfg: CfgNode, args: argparse.Namespace) -> dict:
    """Time ``model.eval()`` forward passes on a batch.

    Args:
        cfg: the config (meta-architecture ``FIBER`` or ``FIBERCoarse``).
        args: parsed command line.

    Returns:
        the measurements (see the module docstring); ``outputs``: detections (detector) or
        embeddings (coarse) of the last pass.
    """
    device = torch.device(args.device)
    autocast, dtype = _autocast(device, args)
    batch, height, width = _model_inputs(cfg, args, train=False)
    memory = PeakMemory(device)
    memory.start()
    model = _build(cfg).eval()
    count = [0]

    def forward() -> None:
        with torch.no_grad(), autocast:
            outputs = model(batch)
        if "instances" in outputs[0]:
            count[0] = sum(len(o["instances"]) for o in outputs)
        else:
            count[0] = sum(1 + len(o["text_embeddings"]) for o in outputs)

    times = _timed(forward, device, args.iters, args.warmup)
    record = _record((height, width), dtype, times["total"], memory, model)
    return {**record, "outputs": count[0]}


def bench_backbone(cfg: CfgNode, args: argparse.Namespace) -> dict:
    """Time forward and forward+backward of the fused backbone with its FPN.

    Args:
        cfg: the config.
        args: parsed command line.

    Returns:
        the measurements (see the module docstring).
    """
    device = torch.device(args.device)
    autocast, dtype = _autocast(device, args)
    memory = PeakMemory(device)
    memory.start()
    torch.manual_seed(0)
    model = build_backbone(cfg, ShapeSpec(channels=3)).to(device)
    height, width = (_padded(s, model.size_divisibility) for s in _input_size(cfg, args))
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, height, width, generator=g).to(device)
    ids, mask, _ = _prompt(cfg, g)
    ids, mask = ids.expand(args.batch, -1).to(device), mask.expand(args.batch, -1).to(device)

    def forward() -> None:
        with torch.no_grad(), autocast:
            model(images, ids, mask)

    def forward_backward() -> None:
        with autocast:
            features, text = model(images, ids, mask)
            loss = sum(f.float().mean() for f in features.values()) + text["hidden"].float().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    model.eval()
    fwd = _timed(forward, device, args.iters, args.warmup)["total"]
    model.train()
    fwd_bwd = _timed(forward_backward, device, args.iters, args.warmup)["total"]
    record = _record((height, width), dtype, fwd, memory, model)
    tokens = args.batch * ((height // 4) * (width // 4) + ids.shape[1])
    return {
        **record,
        "fwd_bwd_ms_median": _median(fwd_bwd),
        "tokens_per_s": round(tokens / (record["ms_median"] / 1000.0), 1),
    }


def bench_export(cfg: CfgNode, args: argparse.Namespace) -> dict:
    """Export the detector (ONNX, TorchScript) and time each runtime against eager.

    All runtimes run :class:`fiber_d2.deploy.ExportableFIBER` (backbone, head, post-processing) on
    the same preprocessed synthetic batch. ``ms_median`` and ``peak_mem_mb`` are eager's; the extra
    key ``runtimes`` maps ``eager``, ``onnxruntime`` and ``torchscript`` to their
    ``ms_median``, ``peak_mem_mb`` (growth over loading and running, see :class:`PeakMemory`),
    ``ratio`` (ms / eager ms), ``detections`` and, for exports, ``export_s``.
    Needs ``pip install fiber_d2[deploy]``.
    """
    import tempfile

    from fiber_d2.deploy import ExportableFIBER, graph_inputs
    from fiber_d2.deploy.runtime import ONNXPredictor, TorchScriptPredictor

    if is_coarse_stage(cfg):
        raise ValueError("--task export needs the fine-grained detector (FIBER) config")
    device = torch.device(args.device)
    batch, height, width = _model_inputs(cfg, args, train=False)
    model = _build(cfg).eval()
    div = model.backbone.size_divisibility
    inputs = graph_inputs(
        batch, cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD, div, model.pad_to_max_query_len
    )
    side = max(_padded(max(height, width), div), 3 * div)
    runners = {
        "onnxruntime": ("onnx", ONNXPredictor),
        "torchscript": ("torchscript", TorchScriptPredictor),
    }
    wrapper = ExportableFIBER(model)
    results: dict[str, dict] = {}

    def measure(name: str, run: Callable, load_memory: PeakMemory | None = None, export_s=None):
        memory = load_memory or PeakMemory(device)
        if load_memory is None:
            memory.start()
        outputs = [None]

        def call() -> None:
            with torch.no_grad():
                outputs[0] = run()

        times = _timed(call, device, args.iters, args.warmup)["total"]
        entry = dict(ms_median=_median(times), peak_mem_mb=round(memory.peak_mb(), 1))
        results[name] = {**entry, "detections": int(len(outputs[0][0]))}
        if export_s is not None:
            results[name]["export_s"] = export_s

    gpu_inputs = tuple(t.to(device) for t in inputs)
    measure("eager", lambda: wrapper(*gpu_inputs))
    with tempfile.TemporaryDirectory() as tmp:
        for name, (fmt, runner_cls) in runners.items():
            try:
                _bench_runner(name, fmt, runner_cls, tmp, cfg, model, batch, side, inputs, measure)
            except Exception as e:  # noqa: BLE001  (one failing format must not hide the others)
                logger.exception("export task: %s failed", name)
                results[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
    eager_ms = results["eager"]["ms_median"]
    for entry in results.values():
        if "ms_median" in entry:
            entry["ratio"] = round(entry["ms_median"] / eager_ms, 3)
    record = dict(height=height, width=width, dtype="float32")
    record.update(ms_median=eager_ms, peak_mem_mb=results["eager"]["peak_mem_mb"])
    return {**record, "params": _params(model), "runtimes": results}


def _bench_runner(name, fmt, runner_cls, tmp, cfg, model, batch, side, inputs, measure) -> None:
    """Export one format into ``tmp`` and time its runner (part of :func:`bench_export`)."""
    from fiber_d2.deploy import export_detector

    device = model.device
    start = time.perf_counter()
    path = os.path.join(tmp, fmt)
    export_detector(cfg, model, fmt, path, batch, max_side=side)
    export_s = round(time.perf_counter() - start, 1)
    memory = PeakMemory(device)
    memory.start()
    # onnxruntime gets torch's intra-op thread count (--threads), so that the ratios compare runtimes
    kwargs = {"intra_op_threads": torch.get_num_threads()} if fmt == "onnx" else {}
    if fmt != "onnx":
        kwargs["device"] = str(device)
    elif device.type == "cuda":
        kwargs["providers"] = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    runner = runner_cls(path, **kwargs)
    measure(name, functools.partial(runner.run_graph, *inputs), memory, export_s)
    del runner
    gc.collect()


def bench_lvis_eval(cfg: CfgNode, args: argparse.Namespace) -> dict:
    """Time the detector on one image with a long vocabulary in prompt chunks.

    Args:
        cfg: the config (meta-architecture ``FIBER``).
        args: parsed command line (--names, --chunk).

    Returns:
        the measurements (see the module docstring).
    """
    if is_coarse_stage(cfg):
        raise ValueError("--task lvis-eval needs a detector config (META_ARCHITECTURE FIBER)")
    device = torch.device(args.device)
    autocast, dtype = _autocast(device, args)
    height, width = _input_size(cfg, args)
    g = torch.Generator().manual_seed(0)
    ids, mask, label_map = chunked_prompts(cfg, args.names, args.chunk, g)
    image = torch.randint(0, 256, (3, height, width), generator=g, dtype=torch.uint8)
    record = dict(image=image, height=height, width=width, input_ids=ids, attention_mask=mask)
    record["label_token_map"] = label_map
    memory = PeakMemory(device)
    memory.start()
    model = _build(cfg).eval()
    count = [0]

    def forward() -> None:
        with torch.no_grad(), autocast:
            count[0] = len(model([record])[0]["instances"])

    times = _timed(forward, device, args.iters, args.warmup)
    div = cfg.INPUT.SIZE_DIVISIBILITY
    size = (_padded(height, div), _padded(width, div))
    result = _record(size, dtype, times["total"], memory, model)
    return {**result, "names": args.names, "chunks": int(ids.shape[0]), "outputs": count[0]}


# ------------------------------------------------------------------------------------ caption
_CAPTION_PROJECT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "projects", "Captioning"
)
_CAPTION_LENGTH = 20  # decoded tokens per caption
_CAPTION_BEAM = 5  # rows per image, as beam search with beam 5


def bench_caption(cfg: CfgNode, args: argparse.Namespace) -> dict:
    """Caption decoding with cached keys/values vs re-encoding the prefix (projects/Captioning).

    The config is a coarse one (e.g. ``configs/FIBER-B/coarse_pretrain.yaml`` with
    ``INPUT.IMAGE_SIZE 576 MODEL.SWIN.WINDOW_SIZE 18`` for the caption recipe); the model is the
    project's ``FIBERCaption`` with its default ``CAPTION`` keys. Each image is encoded once, then
    ``_CAPTION_LENGTH`` decoding steps run on ``_CAPTION_BEAM`` rows per image (a beam of 5; rows are
    re-selected every step as beam search does), through the model's own step functions: cached
    (one new token per step) or re-encoding (the whole prefix, as the original). ``ms_median`` is the
    cached decoding; extra keys ``reencode_ms_median``, ``speedup`` (re-encoding / cached),
    ``image_ms_median`` (the image encoding, the same for both), ``caption_tokens``, ``rows``.
    """
    if _CAPTION_PROJECT not in sys.path:
        sys.path.insert(0, _CAPTION_PROJECT)
    from captioning import add_captioning_config  # noqa: F401  (registers FIBERCaption)

    cfg = cfg.clone()
    cfg.defrost()
    if "CAPTION" not in cfg:
        add_captioning_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "FIBERCaption"
    # offline: only the special-token ids are read (RoBERTa's <s>/<pad>/</s> layout); the vocabulary
    # size stays the config's
    cfg.MODEL.LANGUAGE_BACKBONE.TOKENIZER = "builtin:shapes"
    cfg.CAPTION.MAX_LENGTH = min(cfg.CAPTION.MAX_LENGTH, _CAPTION_LENGTH + 1)
    cfg.freeze()
    device = torch.device(args.device)
    autocast, dtype = _autocast(device, args)
    side = cfg.INPUT.IMAGE_SIZE
    memory = PeakMemory(device)
    memory.start()
    model = _build(cfg).eval()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, side, side, generator=g).to(device)
    rows = args.batch * _CAPTION_BEAM
    lb = cfg.MODEL.LANGUAGE_BACKBONE
    tokens = torch.randint(_FIRST_WORD_ID, lb.VOCAB_SIZE, (rows, _CAPTION_LENGTH), generator=g)
    expand = torch.arange(args.batch).repeat_interleave(_CAPTION_BEAM).to(device)
    perms = [torch.randperm(rows, generator=g).to(device) for _ in range(_CAPTION_LENGTH)]
    image_tokens: dict = {}

    def encode() -> None:
        with torch.no_grad(), autocast:
            image_tokens.update(model.encode_image(images))

    def decode(use_cache: bool) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad(), autocast:
                step, select, state = model.decoder(image_tokens, use_cache)
                state = select(state, expand)
                prefix = torch.full((rows, 1), _BOS_ID, dtype=torch.long, device=device)
                for t in range(_CAPTION_LENGTH):
                    _, state = step(state, prefix)
                    state = select(state, perms[t])  # beam reordering
                    prefix = torch.cat([prefix[perms[t]], tokens[:, t : t + 1].to(device)], 1)

        return run

    image_ms = _timed(encode, device, args.iters, args.warmup)["total"]
    cached = _timed(decode(True), device, args.iters, args.warmup)["total"]
    reencode = _timed(decode(False), device, args.iters, args.warmup)["total"]
    record = _record((side, side), dtype, cached, memory, model)
    return {
        **record,
        "reencode_ms_median": _median(reencode),
        "speedup": round(_median(reencode) / max(record["ms_median"], 1e-9), 2),
        "image_ms_median": _median(image_ms),
        "caption_tokens": _CAPTION_LENGTH,
        "rows": rows,
    }


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
        help="also run with REFERENCE_OVERRIDES (features off) first; print both and their ratio",
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
    if args.height or args.width or args.amp or args.amp_dtype or args.opts or args.reference:
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
        if args.mmap_threshold_mb is not None and args.mmap_threshold_mb < 0:
            raise ValueError(f"--mmap-threshold-mb must be >= 0, got {args.mmap_threshold_mb}")
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
            ref = _finish(args, cfg, TASKS[args.task](reference_cfg(cfg), args), "reference")
            gc.collect()
            new = _finish(args, cfg, TASKS[args.task](cfg, args), "improved")
            ratio = {k: ref[k] for k in ("task", "config", "device", "threads", "dtype")}
            ratio.update(height=ref["height"], width=ref["width"], batch=args.batch)
            ratio.update(variant="ratio", speedup=round(ref["ms_median"] / new["ms_median"], 3))
            ratio["peak_mem_ratio"] = round(new["peak_mem_mb"] / max(ref["peak_mem_mb"], 1e-9), 3)
            ratio["overrides"] = dict(REFERENCE_OVERRIDES)
            print(json.dumps(ratio), flush=True)
            return {"reference": ref, "improved": new, "ratio": ratio}
        result = TASKS[args.task](cfg, args)
    except (ConfigError, ValueError, KeyError) as e:
        sys.exit(f"error: {e}")
    return _finish(args, cfg, result)


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
