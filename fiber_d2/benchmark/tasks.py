"""The timed tasks of ``tools/benchmark.py``: ``bench_<task>(cfg, args) -> dict``.

Each task builds its model (random weights unless ``MODEL.WEIGHTS`` is a local file), runs it on
the synthetic inputs of :mod:`fiber_d2.benchmark.inputs` and returns its measurements:
``height``, ``width``, ``dtype``, ``ms_median``, ``peak_mem_mb``, ``params`` and the task's own
keys (the record and every key are described in ``tools/benchmark.py``'s docstring).
"""

from __future__ import annotations

import argparse
import functools
import gc
import logging
import math
import os
import sys
import time
from collections.abc import Callable

import torch
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone, build_model

from fiber_d2.engine.hooks import ModelEMA
from fiber_d2.engine.optimizer import build_fiber_optimizer
from fiber_d2.engine.trainer import is_coarse_stage

from .inputs import (
    BOS_ID,
    FIRST_WORD_ID,
    chunked_prompts,
    detector_prompt,
    input_size,
    model_inputs,
    padded,
)
from .probes import (
    PeakMemory,
    SavedTensors,
    autocast_context,
    base_record,
    count_params,
    median,
    state_mb,
    sync,
    timed,
)

__all__ = [
    "bench_backbone",
    "bench_caption",
    "bench_export",
    "bench_inference",
    "bench_lvis_eval",
    "bench_train",
    "bench_train_fwd_bwd",
]

logger = logging.getLogger("fiber_d2.benchmark")


def _build(cfg: CfgNode) -> torch.nn.Module:
    """The model of ``cfg`` (seeded by ``SEED``), with ``MODEL.WEIGHTS`` loaded when set."""
    torch.manual_seed(max(cfg.SEED, 0))
    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        from fiber_d2.checkpoint.checkpointer import FIBERCheckpointer

        FIBERCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    return model


def bench_train(cfg: CfgNode, args: argparse.Namespace, full: bool = True) -> dict:
    """Time training iterations: forward, losses, backward and, when ``full``, the optimizer step
    and the EMA update.

    Args:
        cfg: the config (meta-architecture ``FIBER`` or ``FIBERCoarse``).
        args: parsed command line.
        full: the whole iteration (task ``train``); False runs forward + backward only, without an
            optimizer or an EMA copy (task ``train-fwd-bwd``).

    Returns:
        the measurements (see ``tools/benchmark.py``).
    """
    device = torch.device(args.device)
    autocast, dtype = autocast_context(device, args)
    batch, height, width = model_inputs(cfg, args, train=True)
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
        sync(device)
        t1 = time.perf_counter()
        # the current size first: the high-water mark read after it cannot be below it (the other
        # order let an allocation between the two reads put the current size above the peak)
        after_fwd = memory.current_mb()
        breakdown.update(fwd_peak_mem_mb=memory.peak_mb(), after_fwd_mem_mb=after_fwd)
        (scaler.scale(loss) if scaler else loss).backward()
        sync(device)
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

    times = timed(step, device, args.iters, args.warmup)
    if not math.isfinite(last_loss[0]):
        logger.warning("the training loss is not finite: %s", last_loss[0])
    phases = ("fwd", "bwd", "step") if full else ("fwd", "bwd")
    record = {
        **base_record((height, width), dtype, times["total"], memory, model),
        **{f"{k}_ms_median": median(times[k]) for k in phases},
        "trainable_params": count_params(model, trainable=True),
        "loss": round(last_loss[0], 6),
        "params_mb": round(state_mb(dict(model.named_parameters())), 1),
        "grads_mb": round(state_mb({n: p.grad for n, p in model.named_parameters()}), 1),
        **{k: None if v is None else round(v, 1) for k, v in breakdown.items()},
    }
    if full:
        record["fwd_bwd_peak_mem_mb"] = round(fwd_bwd_peak[0], 1)
        record["ema"] = ema is not None
        record["ema_mb"] = round(state_mb(ema.state) if ema is not None else 0.0, 1)
    return record


def bench_train_fwd_bwd(cfg: CfgNode, args: argparse.Namespace) -> dict:
    """Task ``train-fwd-bwd``: :func:`bench_train` without the optimizer and the EMA copy."""
    return bench_train(cfg, args, full=False)


def bench_inference(cfg: CfgNode, args: argparse.Namespace) -> dict:
    """Time ``model.eval()`` forward passes on a batch.

    Args:
        cfg: the config (meta-architecture ``FIBER`` or ``FIBERCoarse``).
        args: parsed command line.

    Returns:
        the measurements (see ``tools/benchmark.py``); ``outputs``: detections (detector) or
        embeddings (coarse) of the last pass.
    """
    device = torch.device(args.device)
    autocast, dtype = autocast_context(device, args)
    batch, height, width = model_inputs(cfg, args, train=False)
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

    times = timed(forward, device, args.iters, args.warmup)
    record = base_record((height, width), dtype, times["total"], memory, model)
    return {**record, "outputs": count[0]}


def bench_backbone(cfg: CfgNode, args: argparse.Namespace) -> dict:
    """Time forward and forward+backward of the fused backbone with its FPN.

    Args:
        cfg: the config.
        args: parsed command line.

    Returns:
        the measurements (see ``tools/benchmark.py``).
    """
    device = torch.device(args.device)
    autocast, dtype = autocast_context(device, args)
    memory = PeakMemory(device)
    memory.start()
    torch.manual_seed(0)
    model = build_backbone(cfg, ShapeSpec(channels=3)).to(device)
    height, width = (padded(s, model.size_divisibility) for s in input_size(cfg, args))
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, height, width, generator=g).to(device)
    ids, mask, _ = detector_prompt(cfg, g)
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
    fwd = timed(forward, device, args.iters, args.warmup)["total"]
    fwd_peak = memory.peak_mb()  # model + inputs + the forward passes (the inference peak)
    model.train()
    fwd_bwd = timed(forward_backward, device, args.iters, args.warmup)["total"]
    record = base_record((height, width), dtype, fwd, memory, model)
    tokens = args.batch * ((height // 4) * (width // 4) + ids.shape[1])
    return {
        **record,
        "fwd_peak_mem_mb": round(fwd_peak, 1),
        "fwd_bwd_ms_median": median(fwd_bwd),
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
    batch, height, width = model_inputs(cfg, args, train=False)
    model = _build(cfg).eval()
    div = model.backbone.size_divisibility
    inputs = graph_inputs(
        batch, cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD, div, model.pad_to_max_query_len
    )
    side = max(padded(max(height, width), div), 3 * div)
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

        times = timed(call, device, args.iters, args.warmup)["total"]
        entry = dict(ms_median=median(times), peak_mem_mb=round(memory.peak_mb(), 1))
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
    return {**record, "params": count_params(model), "runtimes": results}


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
    # onnxruntime gets torch's intra-op thread count (--threads): the ratios compare runtimes
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
        the measurements (see ``tools/benchmark.py``).
    """
    if is_coarse_stage(cfg):
        raise ValueError("--task lvis-eval needs a detector config (META_ARCHITECTURE FIBER)")
    device = torch.device(args.device)
    autocast, dtype = autocast_context(device, args)
    height, width = input_size(cfg, args)
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

    times = timed(forward, device, args.iters, args.warmup)
    div = cfg.INPUT.SIZE_DIVISIBILITY
    size = (padded(height, div), padded(width, div))
    result = base_record(size, dtype, times["total"], memory, model)
    return {**result, "names": args.names, "chunks": int(ids.shape[0]), "outputs": count[0]}


# ------------------------------------------------------------------------------------ caption
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_CAPTION_PROJECT = os.path.join(_REPO_ROOT, "projects", "Captioning")
_CAPTION_LENGTH = 20  # decoded tokens per caption
_CAPTION_BEAM = 5  # rows per image, as beam search with beam 5


def bench_caption(cfg: CfgNode, args: argparse.Namespace) -> dict:
    """Caption decoding with cached keys/values vs re-encoding the prefix (projects/Captioning).

    The config is a coarse one (e.g. ``configs/FIBER-B/coarse_pretrain.yaml`` with
    ``INPUT.IMAGE_SIZE 576 MODEL.SWIN.WINDOW_SIZE 18`` for the caption recipe); the model is the
    project's ``FIBERCaption`` with its default ``CAPTION`` keys. Each image is encoded once, then
    ``_CAPTION_LENGTH`` decoding steps run on ``_CAPTION_BEAM`` rows per image (a beam of 5; rows
    are re-selected every step as beam search does), through the model's own step functions:
    cached (one new token per step) or re-encoding (the whole prefix, as the original).
    ``ms_median`` is the cached decoding; extra keys ``reencode_ms_median``, ``speedup``
    (re-encoding / cached), ``image_ms_median`` (the image encoding, the same for both),
    ``caption_tokens``, ``rows``.
    """
    if not is_coarse_stage(cfg):  # the caption model is the coarse family's: its image size
        raise ValueError(
            "--task caption needs a coarse-stage config (e.g. configs/Demo/coarse_tiny.yaml)"
        )
    if args.height is not None or args.width is not None:
        raise ValueError(
            "--task caption encodes square images of INPUT.IMAGE_SIZE: give that as a config "
            "override (INPUT.IMAGE_SIZE 384) instead of --height / --width"
        )
    if not os.path.isdir(_CAPTION_PROJECT):  # a wheel install: the projects stay in the checkout
        raise ValueError(
            "--task caption runs projects/Captioning, which ships with the source checkout of "
            f"fiber_d2, not with the installed package ({_CAPTION_PROJECT} not found)"
        )
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
    autocast, dtype = autocast_context(device, args)
    side = cfg.INPUT.IMAGE_SIZE
    memory = PeakMemory(device)
    memory.start()
    model = _build(cfg).eval()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, side, side, generator=g).to(device)
    rows = args.batch * _CAPTION_BEAM
    lb = cfg.MODEL.LANGUAGE_BACKBONE
    tokens = torch.randint(FIRST_WORD_ID, lb.VOCAB_SIZE, (rows, _CAPTION_LENGTH), generator=g)
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
                prefix = torch.full((rows, 1), BOS_ID, dtype=torch.long, device=device)
                for t in range(_CAPTION_LENGTH):
                    _, state = step(state, prefix)
                    state = select(state, perms[t])  # beam reordering
                    prefix = torch.cat([prefix[perms[t]], tokens[:, t : t + 1].to(device)], 1)

        return run

    image_ms = timed(encode, device, args.iters, args.warmup)["total"]
    cached = timed(decode(True), device, args.iters, args.warmup)["total"]
    reencode = timed(decode(False), device, args.iters, args.warmup)["total"]
    record = base_record((side, side), dtype, cached, memory, model)
    return {
        **record,
        "reencode_ms_median": median(reencode),
        "speedup": round(median(reencode) / max(record["ms_median"], 1e-9), 2),
        "image_ms_median": median(image_ms),
        "caption_tokens": _CAPTION_LENGTH,
        "rows": rows,
    }
