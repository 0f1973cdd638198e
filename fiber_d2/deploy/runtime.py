"""Runners for exported FIBER detectors, drop-in replacements of :class:`FIBERPredictor`.

``ONNXPredictor`` (onnxruntime) and ``TorchScriptPredictor`` (a traced ``torch.jit`` module) read a directory written by
``tools/deploy/export_model.py`` and are called exactly like ``FIBERPredictor``, with the same
output structure, so switching is one line::

    predictor = FIBERPredictor(cfg)              # eager
    predictor = ONNXPredictor("output/export")   # exported
    out = predictor(image_bgr, ["red circle", "blue square"])

What stays in Python (the exported graph is :class:`~fiber_d2.deploy.graph.ExportableFIBER`):
tokenisation and label maps (the predictor's ``encode``: a fast HF tokenizer has no graph form),
reading and resizing the image, normalising and zero-padding the batch (:func:`graph_inputs`), and
rescaling the boxes to the original image size (``to_image_frame``, as the detector).
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
from detectron2.structures import Boxes, ImageList, Instances

from ..data.resize import FIBERResizeShortestEdge
from ..modeling.head.postprocess import to_image_frame
from ..predictor import FIBERPredictor
from ..text import build_tokenizer, padded_text_length, trim_text

__all__ = [
    "METADATA_FILE",
    "ExportedPredictor",
    "ONNXPredictor",
    "TorchScriptPredictor",
    "graph_inputs",
    "load_metadata",
    "split_detections",
]

logger = logging.getLogger(__name__)

METADATA_FILE = "fiber_export.json"
"""Name of the metadata file written next to the exported model."""


def load_metadata(export_dir: str | os.PathLike) -> dict:
    """Read the metadata of an export directory.

    Raises:
        FileNotFoundError: no export in ``export_dir``.
    """
    path = Path(export_dir) / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: export a model with tools/deploy/export_model.py first"
        )
    return json.loads(path.read_text())


def graph_inputs(
    records: List[dict],
    pixel_mean,
    pixel_std,
    size_divisibility: int,
    pad_to_max_query_len: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Host preprocessing: the exported graph's inputs from mapper-style records.

    Args:
        records: dicts with ``image`` uint8 (3, h, w) (resized), ``input_ids`` /
            ``attention_mask`` (T,) and ``label_token_map`` (L_i, T).
        pixel_mean, pixel_std: per-channel normalisation (``MODEL.PIXEL_MEAN`` / ``PIXEL_STD``).
        size_divisibility: padding multiple of the batch.
        pad_to_max_query_len: keep the tokenized length; False cuts the text to the batch's
            longest prompt rounded up, as ``FIBER`` does (``INPUT.PAD_TO_MAX_QUERY_LEN``).

    Returns:
        ``images`` (B, 3, H, W) float32 normalised then zero-padded (as ``FIBER.preprocess_image``),
        ``image_sizes`` (B, 2) int64, ``input_ids`` / ``attention_mask`` (B, T') int64,
        ``label_token_map`` (B, L, T') bool with L = max L_i (extra rows all False); T' as
        ``FIBER`` runs the batch (:func:`~fiber_d2.text.padded_text_length`).
    """
    mean = torch.as_tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.as_tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1)
    images = ImageList.from_tensors(
        [(r["image"].to(torch.float32) - mean) / std for r in records], size_divisibility
    )
    lengths = {tuple(r["input_ids"].shape) for r in records}
    if len(lengths) != 1:
        raise ValueError(f"all samples of a batch need the same text length, got {sorted(lengths)}")
    ids = torch.stack([r["input_ids"] for r in records]).long()
    mask = torch.stack([r["attention_mask"] for r in records]).long()
    num_labels = max(r["label_token_map"].shape[0] for r in records)
    label_map = torch.zeros(len(records), num_labels, ids.shape[1], dtype=torch.bool)
    for i, r in enumerate(records):
        label_map[i, : r["label_token_map"].shape[0]] = r["label_token_map"] > 0
    sizes = torch.tensor(images.image_sizes, dtype=torch.long).reshape(-1, 2)
    length = padded_text_length(mask, pad_to_max_query_len)
    ids, mask, label_map = (t.contiguous() for t in trim_text(length, ids, mask, label_map))
    return images.tensor.contiguous(), sizes, ids, mask, label_map


def split_detections(outputs, image_sizes: torch.Tensor) -> List[Instances]:
    """Per-image ``Instances`` from the graph's flat outputs.

    Args:
        outputs: (batch_index (K,), boxes (K, 4), scores (K,), labels (K,)).
        image_sizes: (B, 2) resized image sizes.

    Returns:
        B Instances (``pred_boxes`` legacy xyxy, ``scores``, ``pred_classes``), as ``FIBER._detect``.
    """
    batch_index, boxes, scores, labels = (torch.as_tensor(np.asarray(o)) for o in outputs)
    results = []
    for i, (h, w) in enumerate(image_sizes.tolist()):
        sel = batch_index == i
        inst = Instances((h, w))
        inst.pred_boxes = Boxes(boxes[sel].float())
        inst.scores = scores[sel].float()
        inst.pred_classes = labels[sel].long()
        results.append(inst)
    return results


class ExportedPredictor(FIBERPredictor):
    """Base of the runners: ``FIBERPredictor``'s text and image handling around an exported graph.

    Subclasses implement :meth:`run_graph`.
    """

    artifact_key = ""

    def __init__(self, export_dir: str | os.PathLike, *, tokenizer=None):
        """
        Args:
            export_dir: directory written by ``tools/deploy/export_model.py``.
            tokenizer: override the exported tokenizer (a fast tokenizer or a name for
                :func:`fiber_d2.text.build_tokenizer`); default: the config's.
        """
        # FIBERPredictor.__init__ wants an eager model: set its input-side attributes here.
        meta = load_metadata(export_dir)
        if meta.get("format") != self.artifact_key:
            raise ValueError(
                f"{Path(export_dir) / METADATA_FILE} holds a {meta.get('format')!r} export; "
                f"{type(self).__name__} runs {self.artifact_key!r} exports"
            )
        self.meta = meta
        self.export_dir = Path(export_dir)
        tokenizer = meta["tokenizer"] if tokenizer is None else tokenizer
        self.tokenizer = build_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        self.aug = FIBERResizeShortestEdge(
            [meta["min_size_test"], meta["min_size_test"]], meta["max_size_test"]
        )
        self.input_format = meta["input_format"]
        self.max_query_len = meta["max_text_len"]
        self.separator = meta["separator"]
        self.chunk_size = meta["chunk_size"]
        self.nms_threshold = meta["nms_threshold"]
        self.dtype = torch.float32
        self._cache = OrderedDict()
        # FIBERPredictor's __call__ runs ``self.model(records)`` under no_grad: the exported graph
        self.model = self.inference

    @property
    def model_path(self) -> Path:
        """The exported model file."""
        return self.export_dir / self.meta["file"]

    # ------------------------------------------------------------------ graph
    def check_inputs(self, images: torch.Tensor, input_ids: torch.Tensor) -> None:
        """Raise a clear error for inputs outside the exported dynamic ranges.

        Raises:
            ValueError: text longer than the exported maximum, image side outside the exported
                range, batch larger than exported.
        """
        meta = self.meta
        if input_ids.shape[1] > meta["max_text_len"]:
            raise ValueError(
                f"prompt of {input_ids.shape[1]} tokens is longer than the exported maximum text "
                f"length {meta['max_text_len']} ({self.model_path}); shorten it, or re-export "
                "with a larger MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN"
            )
        height, width = images.shape[-2:]
        low, high = meta["min_side"], meta["max_side"]
        if not (low <= height <= high and low <= width <= high):
            raise ValueError(
                f"padded image size {height}x{width} is outside the exported range [{low}, {high}] "
                f"per side ({self.model_path}); the runner resizes as the model does, so re-export "
                "with a wider --min-side / --max-side range, or pad a very elongated image to a "
                "squarer shape"
            )
        if images.shape[0] > meta["max_batch"]:
            raise ValueError(
                f"batch of {images.shape[0]} images exceeds the exported maximum "
                f"{meta['max_batch']} ({self.model_path})"
            )

    def run_graph(self, *inputs: torch.Tensor) -> tuple:
        """Run the exported graph on :func:`graph_inputs` outputs; returns its 4 outputs."""
        raise NotImplementedError

    def detect(self, records: List[dict]) -> List[Instances]:
        """``FIBER._detect`` on the exported graph: records with 1-d text, one batch."""
        meta = self.meta
        inputs = graph_inputs(
            records,
            meta["pixel_mean"],
            meta["pixel_std"],
            meta["size_divisibility"],
            meta["pad_to_max_query_len"],
        )
        self.check_inputs(inputs[0], inputs[2])
        return split_detections(self.run_graph(*inputs), inputs[1])

    def inference(self, records: List[dict]) -> List[dict]:
        """``FIBER.inference``: records as the mapper (and the predictor) produce them."""
        if any(r["input_ids"].dim() == 2 for r in records):
            return [self._inference_chunked(r) for r in records]
        results = self.detect(records)
        return [_postprocess(res, r) for res, r in zip(results, records)]

    def _inference_chunked(self, record: dict) -> dict:
        ids, mask, maps = record["input_ids"], record["attention_mask"], record["label_token_map"]
        if ids.dim() == 1:
            ids, mask, maps = ids[None], mask[None], maps[None]
        parts = []
        for k in range(ids.shape[0]):
            chunk = dict(record, input_ids=ids[k], attention_mask=mask[k], label_token_map=maps[k])
            parts.append(self.detect([chunk])[0])
        return _postprocess(Instances.cat(parts), record)


def _postprocess(result: Instances, record: dict) -> dict:
    """``FIBER._postprocess``: legacy boxes -> detectron2 boxes on the original image."""
    height = record.get("height", result.image_size[0])
    width = record.get("width", result.image_size[1])
    return {"instances": to_image_frame(result, height, width)}


class ONNXPredictor(ExportedPredictor):
    """Runs an ONNX export with onnxruntime (``pip install fiber_d2[deploy]``)."""

    artifact_key = "onnx"

    def __init__(
        self,
        export_dir: str | os.PathLike,
        *,
        tokenizer=None,
        providers: Optional[List[str]] = None,
        intra_op_threads: int = 0,
    ):
        """
        Args:
            export_dir: directory written by ``tools/deploy/export_model.py --format onnx``.
            tokenizer: see :class:`ExportedPredictor`.
            providers: onnxruntime execution providers (default: CPU).
            intra_op_threads: onnxruntime intra-op threads (0: its default).
        """
        super().__init__(export_dir, tokenizer=tokenizer)
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ImportError(
                "ONNXPredictor needs onnxruntime: pip install 'fiber_d2[deploy]'"
            ) from e
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        self.session = ort.InferenceSession(
            str(self.model_path), options, providers=providers or ["CPUExecutionProvider"]
        )
        self._input_names = [i.name for i in self.session.get_inputs()]

    def run_graph(self, *inputs: torch.Tensor) -> tuple:
        feed = {name: t.numpy() for name, t in zip(self._input_names, inputs)}
        return tuple(self.session.run(None, feed))


class TorchScriptPredictor(ExportedPredictor):
    """Runs a traced TorchScript module (``.ts``), also loadable from C++ with ``torch::jit::load``.

    The trace records the export device in its constants (anchors, box offsets): an export made on
    the CPU (as ``tools/deploy/export_model.py`` does) runs on the CPU.
    """

    artifact_key = "torchscript"

    def __init__(self, export_dir: str | os.PathLike, *, tokenizer=None, device: str | None = None):
        """
        Args:
            export_dir: directory written by ``tools/deploy/export_model.py --format torchscript``.
            tokenizer: see :class:`ExportedPredictor`.
            device: where to run (default and only tested: the export's device).
        """
        super().__init__(export_dir, tokenizer=tokenizer)
        from . import graph  # noqa: F401  (registers fiber_d2::batched_nms before loading)

        self.device = torch.device(device or self.meta["device"])
        self.module = torch.jit.load(str(self.model_path), map_location=self.device)

    def run_graph(self, *inputs: torch.Tensor) -> tuple:
        with torch.no_grad():
            outputs = self.module(*(t.to(self.device) for t in inputs))
        return tuple(o.cpu() for o in outputs)
