"""``FIBERPredictor``: run the grounding detector on raw images with free-form prompts.

In the spirit of detectron2's ``DefaultPredictor``: it builds the model in eval mode, loads
``MODEL.WEIGHTS``, resizes with ``ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST)`` and returns
detectron2 outputs at the original image size. Unlike it, every call also takes a text prompt:

* a list of category names -> one detection prompt, the names joined by
  ``DATASETS.SEPARATION_TOKENS`` (spec 4.3); label l is name l. A list too long for one prompt
  of ``MAX_QUERY_LEN`` tokens is split into chunks (``TEST.CHUNKED_EVALUATION`` names per chunk
  when > 0, otherwise as many as fit) that run one forward pass each, as LVIS evaluation does;
* a caption str with optional phrases (``[start, end)`` char spans or substrings of the caption);
  label p is phrase p; without phrases the whole caption is the only label.

Several images with one prompt each run as ONE batched forward pass (images zero-padded to a
common size, as detectron2 batches them), unless a prompt needs chunks: then every image of the
call runs prompt chunk by prompt chunk (the model's chunked path).

    predictor = FIBERPredictor.from_pretrained("demo")            # or FIBERPredictor(cfg)
    out = predictor("image.jpg", ["red circle", "blue square"], threshold=0.3)
    out = predictor(image_bgr, "a red circle left of a blue square", phrases=["red circle"])
    outs = predictor([img1, img2], [["circle"], "a blue square"])
    picture = predictor.draw("image.jpg", out)                   # RGB uint8 array

Images may be BGR uint8 numpy arrays (detectron2 / OpenCV order; ``image_format="RGB"`` for RGB
arrays), PIL images, file paths, torch uint8 tensors (3, H, W) (torchvision order: RGB unless
``image_format="BGR"``), or lists of these. Every result is a dict:
``{"instances": Instances, "label_names": [L str], "pred_labels": [N str], "caption": ...}``.
This call signature is a public contract (other runners mirror it).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.modeling import META_ARCH_REGISTRY, build_model
from detectron2.structures import Instances
from PIL import Image
from torch import nn
from torchvision.ops import nms

from .checkpoint.checkpointer import load_model_weights
from .data.mapper import encode_category_prompts
from .modeling.meta_arch.fiber import FIBER
from .text import build_tokenizer, char_spans_to_positive_map, tokenize

__all__ = ["FIBERPredictor", "split_prompt", "to_coco_json", "resolve_dtype"]

logger = logging.getLogger(__name__)

ImageLike = Union[np.ndarray, str, os.PathLike, Image.Image, torch.Tensor]
Prompt = Union[str, Sequence[str]]
Phrase = Union[str, Sequence[int]]

_CACHE_SIZE = 32
_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def resolve_dtype(dtype: Union[str, torch.dtype, None]) -> torch.dtype:
    """``"fp32"``/``"bf16"``/``"fp16"`` (or their long names, or a torch dtype) -> torch dtype.

    Raises:
        ValueError: any other value (one line listing the accepted ones).
    """
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"unknown dtype {dtype!r}; use one of fp32, bf16, fp16")


def _check_threshold(threshold: Optional[float]) -> None:
    if threshold is not None and not (
        isinstance(threshold, (int, float)) and 0.0 <= float(threshold) <= 1.0
    ):
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")


def split_prompt(text: str, separator: str = ". ") -> List[str]:
    """Split a detection prompt such as ``"red circle. blue square."`` into category names.

    Args:
        text: names joined by ``separator``; surrounding whitespace, a trailing separator and
            empty entries are ignored.
        separator: the prompt separator (``DATASETS.SEPARATION_TOKENS``).

    Returns:
        the list of names.

    Raises:
        ValueError: no name in ``text``.
    """
    names = [n.strip() for n in text.split(separator)] if separator else [text.strip()]
    tail = separator.strip()
    if names and tail and names[-1].endswith(tail):
        names[-1] = names[-1][: -len(tail)].strip()
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"prompt {text!r} contains no category name")
    return names


def _check_detector(meta_architecture: str) -> None:
    cls = META_ARCH_REGISTRY.get(meta_architecture)
    if not (isinstance(cls, type) and issubclass(cls, FIBER)):
        raise ValueError(
            f"MODEL.META_ARCHITECTURE {meta_architecture!r} does not predict boxes; "
            "FIBERPredictor needs the fine-grained detector 'FIBER'"
        )


class FIBERPredictor:
    """Single-device inference with text prompts (see the module docstring)."""

    @configurable
    def __init__(
        self,
        *,
        model: nn.Module,
        tokenizer,
        min_size_test: int = 800,
        max_size_test: int = 1333,
        input_format: str = "BGR",
        max_query_len: Optional[int] = None,
        separator: str = ". ",
        chunk_size: int = -1,
        nms_threshold: float = 0.6,
        device: Optional[str] = None,
        dtype: Union[str, torch.dtype, None] = None,
    ):
        """
        Args:
            model: a :class:`FIBER` detector (put in eval mode here).
            tokenizer: a fast tokenizer, or a name for :func:`fiber_d2.text.build_tokenizer`.
            min_size_test, max_size_test: test-time ``ResizeShortestEdge`` sizes.
            input_format: channel order the model expects ("BGR" or "RGB"); inputs are BGR.
            max_query_len: padded token length T; None: read from the model's text tower
                (``MAX_QUERY_LEN`` capped by its position table).
            separator: joins category names (``DATASETS.SEPARATION_TOKENS``).
            chunk_size: names per prompt chunk (``TEST.CHUNKED_EVALUATION``); <= 0: as many as
                fit in ``max_query_len`` tokens.
            nms_threshold: IoU of ``class_agnostic_nms=True`` (the model's ``ATSS.NMS_TH``).
            device: move the model there ("cpu", "cuda", "cuda:1"); None: leave it where it is.
            dtype: "fp32" (default), "bf16" or "fp16": the forward pass runs under autocast in
                that dtype; outputs are float32.
        """
        if not isinstance(model, FIBER):
            raise ValueError(
                f"FIBERPredictor needs a FIBER detector, got {type(model).__name__} "
                "(only the fine-grained detector predicts boxes)"
            )
        if input_format not in ("BGR", "RGB"):
            raise ValueError(f"INPUT.FORMAT must be BGR or RGB, got {input_format!r}")
        self.dtype = resolve_dtype(dtype)
        self.model = model.eval() if device is None else model.to(device).eval()
        self.tokenizer = build_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        self.aug = T.ResizeShortestEdge([min_size_test, min_size_test], max_size_test)
        self.input_format = input_format
        self.max_query_len = max_query_len or _model_query_len(model)
        self.nms_threshold = nms_threshold
        self.separator = separator
        self.chunk_size = chunk_size
        self._cache: "OrderedDict[tuple, dict]" = OrderedDict()

    @classmethod
    def from_config(cls, cfg):
        _check_detector(cfg.MODEL.META_ARCHITECTURE)
        weights = cfg.MODEL.WEIGHTS
        if weights and "://" not in weights and not os.path.isfile(weights):
            raise FileNotFoundError(f"MODEL.WEIGHTS file not found: {weights}")
        model = build_model(cfg.clone())
        load_model_weights(model, cfg)  # safe formats, strict unless MODEL.WEIGHTS_PARTIAL_OK
        return {
            "model": model,
            "tokenizer": build_tokenizer(cfg.MODEL.LANGUAGE_BACKBONE.TOKENIZER),
            "min_size_test": cfg.INPUT.MIN_SIZE_TEST,
            "max_size_test": cfg.INPUT.MAX_SIZE_TEST,
            "input_format": cfg.INPUT.FORMAT,
            "max_query_len": _model_query_len(model),
            "separator": cfg.DATASETS.SEPARATION_TOKENS,
            "chunk_size": cfg.TEST.CHUNKED_EVALUATION,
            "nms_threshold": cfg.MODEL.ATSS.NMS_TH,
        }

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: Union[str, os.PathLike],
        *,
        config: Optional[str] = None,
        device: Optional[str] = None,
        dtype: Union[str, torch.dtype, None] = None,
        opts: Optional[List[str]] = None,
    ) -> "FIBERPredictor":
        """A predictor for a model-zoo name or a local weights file.

        Args:
            name_or_path: a :mod:`fiber_d2.model_zoo` name (``"demo"``, ``"fiber-b/coco"``, ...) or
                a local file in fiber_d2's or the original layout (converted in memory and cached
                next to it as safetensors).
            config: for a local file: a model-zoo name or a yaml giving the architecture
                (default: ``fiber-b/coco``'s, the FIBER-B detector).
            device: "cpu", "cuda", ...; None: CUDA when available, else the CPU.
            dtype: "fp32" (default), "bf16" or "fp16" (autocast).
            opts: ``KEY VALUE`` config overrides.

        Raises:
            KeyError: an unknown name (the known names are listed). FileNotFoundError: the file
            is missing (one line saying which file to fetch and where to put it). ValueError: an
            unreadable file, another architecture, a coarse-grained entry, a bad dtype.
        """
        from . import model_zoo
        from .engine.setup import load_config

        resolve_dtype(dtype)  # fail before building anything
        name = os.fspath(name_or_path)
        if name in model_zoo.names():
            entry = model_zoo.entry(name)
            if entry.stage != "fine":
                raise ValueError(
                    f"model-zoo entry {name!r} is coarse-grained (no boxes); FIBERPredictor needs a "
                    f"fine-grained one: {', '.join(model_zoo.names('fine'))}"
                )
            weights = model_zoo.get_weights_path(name)
            cfg = model_zoo.get_config(name, opts)
        elif os.path.isfile(os.path.expanduser(name)):
            weights = os.path.expanduser(name)
            config = config or "fiber-b/coco"
            if config in model_zoo.names():
                cfg = model_zoo.get_config(config, opts)
            else:
                cfg = load_config(config, opts)
        elif name.endswith((".pth", ".pt", ".ckpt", ".safetensors")):
            raise FileNotFoundError(f"weights file not found: {name}")
        else:
            model_zoo.entry(name)  # raises KeyError listing the known names
        _check_detector(cfg.MODEL.META_ARCHITECTURE)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        cfg.MODEL.DEVICE = device
        cfg.MODEL.WEIGHTS = ""
        model = build_model(cfg)
        model_zoo.load_weights(model, weights)
        return cls(
            model=model,
            tokenizer=build_tokenizer(cfg.MODEL.LANGUAGE_BACKBONE.TOKENIZER),
            min_size_test=cfg.INPUT.MIN_SIZE_TEST,
            max_size_test=cfg.INPUT.MAX_SIZE_TEST,
            input_format=cfg.INPUT.FORMAT,
            separator=cfg.DATASETS.SEPARATION_TOKENS,
            chunk_size=cfg.TEST.CHUNKED_EVALUATION,
            nms_threshold=cfg.MODEL.ATSS.NMS_TH,
            dtype=dtype,
        )

    # ------------------------------------------------------------------ text
    def encode(self, prompt: Prompt, phrases: Optional[Sequence[Phrase]] = None) -> dict:
        """Turn one prompt into the model's text inputs.

        Args:
            prompt: a list of category names, or a caption str.
            phrases: caption only: ``[start, end)`` char spans or substrings of the caption, one
                per label; None: the whole caption is one label.

        Returns:
            dict with ``caption`` (str, or list of K str when chunked), ``label_names`` (L str),
            ``input_ids``/``attention_mask`` LongTensor (T,) or (K, T), ``label_token_map``
            BoolTensor (L, T) or (K, L, T). Cached: treat the tensors as read-only.

        Raises:
            ValueError: empty prompt or phrase, a phrase not in the caption, a caption longer
                than ``max_query_len`` tokens, a category name that fits no prompt.
        """
        if isinstance(prompt, str):
            key = ("caption", prompt, None if phrases is None else tuple(map(_phrase_key, phrases)))
        elif isinstance(prompt, Sequence):
            if phrases is not None:
                raise ValueError("phrases are only accepted with a caption str, not a name list")
            key = ("names", tuple(prompt))
        else:
            raise ValueError(f"prompt must be a caption str or a list of names, got {prompt!r}")
        if key not in self._cache:
            if isinstance(prompt, str):
                self._cache[key] = self._encode_caption(prompt, phrases)
            else:
                self._cache[key] = self._encode_names(list(prompt))
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key]

    def _encode_names(self, names: List[str]) -> dict:
        if not names:
            raise ValueError("empty prompt: the category list has no names")
        for i, name in enumerate(names):
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"empty prompt entry {i}: {name!r}")
        # Budget-driven chunking when TEST.CHUNKED_EVALUATION is off: one prompt if it fits.
        chunk_size = self.chunk_size if self.chunk_size > 0 else len(names)
        enc = encode_category_prompts(
            self.tokenizer,
            names,
            max_query_len=self.max_query_len,
            separator=self.separator,
            chunk_size=chunk_size,
            squeeze=True,
        )
        chunks = enc.pop("chunks")
        if len(chunks) > 1:
            logger.info("%d names split into %d prompt chunks", len(names), len(chunks))
        return {**enc, "label_names": list(names)}

    def _phrase_spans(self, caption: str, phrases: Optional[Sequence[Phrase]]) -> List[List[int]]:
        if phrases is None:
            return [[0, len(caption)]]
        if isinstance(phrases, str) or len(phrases) == 0:
            raise ValueError(
                f"phrases must be a non-empty list of spans or substrings, got {phrases!r} "
                "(pass None to ground the whole caption)"
            )
        spans: List[List[int]] = []
        next_start: Dict[str, int] = {}
        for i, phrase in enumerate(phrases):
            if isinstance(phrase, str):
                if not phrase.strip():
                    raise ValueError(f"phrase {i} is empty")
                start = caption.find(phrase, next_start.get(phrase, 0))
                if start < 0:
                    raise ValueError(f"phrase {i} {phrase!r} is not in the caption {caption!r}")
                next_start[phrase] = start + len(phrase)  # a repeated phrase takes the next match
                spans.append([start, start + len(phrase)])
                continue
            if len(phrase) != 2 or not all(isinstance(v, (int, np.integer)) for v in phrase):
                raise ValueError(f"phrase {i} {phrase!r} is neither a str nor a (start, end) pair")
            start, end = int(phrase[0]), int(phrase[1])
            if not 0 <= start < end <= len(caption):
                raise ValueError(
                    f"phrase {i} span [{start}, {end}) is outside the caption (length {len(caption)})"
                )
            if not caption[start:end].strip():
                raise ValueError(f"phrase {i} span [{start}, {end}) covers only whitespace")
            spans.append([start, end])
        return spans

    def _encode_caption(self, caption: str, phrases: Optional[Sequence[Phrase]]) -> dict:
        if not caption.strip():
            raise ValueError("empty prompt: the caption has no text")
        spans = self._phrase_spans(caption, phrases)
        needed = len(self.tokenizer.tokenize(caption))
        if needed > self.max_query_len - 2:
            raise ValueError(
                f"caption needs {needed} tokens, MAX_QUERY_LEN {self.max_query_len} holds "
                f"{self.max_query_len - 2}; shorten it or pass a list of names (chunked)"
            )
        enc = tokenize(self.tokenizer, caption, self.max_query_len)
        label_map = char_spans_to_positive_map(enc, [[s] for s in spans], self.max_query_len)
        return {
            "caption": caption,
            "label_names": [caption[b:e] for b, e in spans],
            "input_ids": enc["input_ids"][0],
            "attention_mask": enc["attention_mask"][0],
            "label_token_map": label_map,
        }

    # ------------------------------------------------------------------ images
    def read_image(self, image: ImageLike, image_format: Optional[str] = None) -> np.ndarray:
        """Any accepted image as a uint8 array (H, W, 3) in the model's channel order.

        Args:
            image: a uint8 numpy array (H, W, 3), a PIL image, a file path, or a uint8 torch
                tensor (3, H, W) or (H, W, 3).
            image_format: channel order of an array / tensor: "BGR" or "RGB"; None: BGR for
                numpy arrays (OpenCV / detectron2), RGB for tensors (torchvision).

        Raises:
            FileNotFoundError: a missing file. ValueError: an unreadable file or a wrong array.
        """
        if image_format not in (None, "BGR", "RGB"):
            raise ValueError(f"image_format must be 'BGR' or 'RGB', got {image_format!r}")
        if isinstance(image, (str, os.PathLike)):
            path = os.fspath(image)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"image not found: {path}")
            try:
                return utils.read_image(path, format=self.input_format)
            except (OSError, ValueError, SyntaxError) as e:
                raise ValueError(f"cannot read image {path}: {e}") from None
        if isinstance(image, Image.Image):
            array = np.asarray(image.convert("RGB"))
            return array[:, :, ::-1] if self.input_format == "BGR" else array
        order = image_format
        if isinstance(image, torch.Tensor):
            order = order or "RGB"
            array = image.detach().cpu()
            if array.ndim == 3 and array.shape[0] == 3 and array.shape[2] != 3:
                array = array.permute(1, 2, 0)
            image = array.numpy()
        elif not isinstance(image, np.ndarray):
            raise ValueError(
                f"image must be a numpy array, PIL image, path or tensor, got {type(image)}"
            )
        order = order or "BGR"
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"image must be a BGR uint8 array (H, W, 3) (RGB with image_format='RGB'), "
                f"got {image.dtype} {image.shape}"
            )
        return image[:, :, ::-1] if order != self.input_format else image

    def preprocess_image(self, image: ImageLike, image_format: Optional[str] = None) -> dict:
        """Read (if needed), convert and resize one image.

        Args:
            image: see :meth:`read_image`.
            image_format: see :meth:`read_image`.

        Returns:
            dict with ``image`` uint8 Tensor (3, h, w) in the model's format (resized) and the
            original ``height`` / ``width``.
        """
        array = self.read_image(image, image_format)
        height, width = array.shape[:2]
        if height < 1 or width < 1:
            raise ValueError(f"image is empty: {array.shape}")
        resized = self.aug.get_transform(array).apply_image(array)
        tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        return {"image": tensor, "height": height, "width": width}

    # ------------------------------------------------------------------ call
    def __call__(
        self,
        images: Union[ImageLike, Sequence[ImageLike]],
        prompts: Union[Prompt, Sequence[Prompt]],
        phrases: Optional[Sequence] = None,
        *,
        image_format: Optional[str] = None,
        threshold: Optional[float] = None,
        class_agnostic_nms: Union[bool, float] = False,
        max_detections: Optional[int] = None,
    ) -> Union[dict, List[dict]]:
        """Detect the prompt's labels in one image, or in a batch of images.

        Args:
            images: one image (numpy array, PIL image, path or tensor, see :meth:`read_image`),
                or a list of N of them (batch; a (N, 3, H, W) tensor counts as a list).
            prompts: single image: a category-name list or a caption; batch: a list of N such
                prompts (one per image), or one caption str shared by all images.
            phrases: single image: the caption's phrases (see :meth:`encode`); batch: a list of
                N such lists (None entries allowed), or None.
            image_format: channel order of array / tensor images (see :meth:`read_image`).
            threshold: keep boxes scoring at least this, in [0, 1]; None: every box the model
                returns (its ``ATSS.INFERENCE_TH``).
            class_agnostic_nms: True: one box per object across labels (NMS at the model's IoU,
                ``ATSS.NMS_TH``); a float: NMS at that IoU; False: the model's per-label NMS only.
            max_detections: keep at most this many boxes per image (highest scores).

        Returns:
            single image: ``{"instances": Instances, "label_names": list[str], "pred_labels":
            list[str], "caption": ...}``; ``instances`` has ``pred_boxes`` (xyxy, original image
            size), ``scores`` and ``pred_classes`` (index into ``label_names``), sorted by score;
            ``pred_labels[i]`` is the text label of box i. Batch: a list of N such dicts.

        Raises:
            ValueError: a bad prompt, image, threshold or option (one line).
        """
        _check_threshold(threshold)
        if max_detections is not None and (
            not isinstance(max_detections, int) or max_detections < 1
        ):
            raise ValueError(f"max_detections must be a positive int, got {max_detections!r}")
        if isinstance(class_agnostic_nms, float) and not 0.0 < class_agnostic_nms <= 1.0:
            raise ValueError(f"class_agnostic_nms IoU must be in (0, 1], got {class_agnostic_nms}")
        post = {"threshold": threshold, "nms": class_agnostic_nms, "top": max_detections}
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            images = list(images)
        if isinstance(images, (list, tuple)):
            count = len(images)
            if count == 0:
                raise ValueError("no images given")
            if isinstance(prompts, str):
                prompts = [prompts] * count
            if not isinstance(prompts, (list, tuple)) or len(prompts) != count:
                raise ValueError(f"{count} images need {count} prompts (one per image)")
            phrases = [None] * count if phrases is None else list(phrases)
            if len(phrases) != count:
                raise ValueError(f"{count} images need {count} phrase lists, got {len(phrases)}")
            return self._predict(list(images), list(prompts), phrases, image_format, post)
        return self._predict([images], [prompts], [phrases], image_format, post)[0]

    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.model.device.type, dtype=self.dtype)

    def _predict(self, images, prompts, phrases, image_format, post) -> List[dict]:
        texts = [self.encode(p, ph) for p, ph in zip(prompts, phrases)]
        inputs = []
        for image, text in zip(images, texts):
            x = self.preprocess_image(image, image_format)
            x.update({k: text[k] for k in ("input_ids", "attention_mask", "label_token_map")})
            inputs.append(x)
        with torch.no_grad(), self._autocast():
            outputs = self.model(inputs)
        results = []
        for out, text in zip(outputs, texts):
            inst = self._select(out["instances"], **post)
            names = list(text["label_names"])
            results.append(
                {
                    "instances": inst,
                    "label_names": names,
                    "pred_labels": [names[int(c)] for c in inst.pred_classes],
                    "caption": text["caption"],
                }
            )
        return results

    def _select(self, inst: Instances, threshold, nms, top) -> Instances:
        """float32 fields, score order, then threshold / class-agnostic NMS / top-k."""
        inst.pred_boxes.tensor = inst.pred_boxes.tensor.float()
        inst.scores = inst.scores.float()
        inst = inst[inst.scores.argsort(descending=True)]
        if threshold is not None:
            inst = inst[inst.scores >= threshold]
        if nms is not False and nms is not None and len(inst):
            iou = self.nms_threshold if nms is True else float(nms)
            inst = inst[nms_keep(inst.pred_boxes.tensor, inst.scores, iou)]
        if top is not None:
            inst = inst[:top]
        return inst

    # ------------------------------------------------------------------ output
    def draw(
        self,
        image: ImageLike,
        result: dict,
        *,
        threshold: float = 0.3,
        image_format: Optional[str] = None,
        min_size: int = 512,
    ) -> np.ndarray:
        """The image with the result's boxes and text labels (see :func:`draw_grounding`).

        Args:
            image: the image the result belongs to (any accepted input).
            result: one output of :meth:`__call__`.
            threshold: minimum drawn score.
            image_format: channel order of an array / tensor image.
            min_size: small images are upscaled so that their shorter side is at least this.

        Returns:
            RGB uint8 array (H', W', 3).
        """
        from .visualize import draw_grounding

        _check_threshold(threshold)
        array = self.read_image(image, image_format)
        rgb = array[:, :, ::-1] if self.input_format == "BGR" else array
        return draw_grounding(
            np.ascontiguousarray(rgb),
            result["instances"],
            result["label_names"],
            threshold,
            min_size=min_size,
        )


def nms_keep(boxes: torch.Tensor, scores: torch.Tensor, iou: float) -> torch.Tensor:
    """Indices kept by class-agnostic NMS (torchvision), in decreasing score order."""
    return nms(boxes.float(), scores.float(), iou)


def _model_query_len(model: nn.Module) -> int:
    """The padded text length of the model's text tower (``MAX_QUERY_LEN`` within its positions)."""
    for module in model.modules():
        max_len = getattr(module, "max_len", None)
        if isinstance(max_len, int) and hasattr(module, "fused_layer_ids"):
            return max_len
    raise ValueError(f"cannot read the query length: {type(model).__name__} has no text tower")


def to_coco_json(
    results: Union[dict, Iterable[dict]],
    image_ids: Union[int, Sequence[int]],
    category_ids: Optional[Sequence[int]] = None,
) -> List[dict]:
    """COCO detection results (``loadRes`` format) with the text label of every box.

    Args:
        results: one :class:`FIBERPredictor` output, or a list of them.
        image_ids: the image id of each result (one int for one result).
        category_ids: COCO category id of each label (``label_names`` order); None: label index
            + 1 (the order of the prompt's names).

    Returns:
        list of ``{"image_id", "category_id", "bbox": [x, y, w, h], "score", "label"}``
        (detectron2's ``instances_to_coco_json`` records plus ``label``).

    Raises:
        ValueError: as many image ids as results are needed.
    """
    if isinstance(results, dict):
        results = [results]
    results = list(results)
    if isinstance(image_ids, (int, np.integer)):
        image_ids = [int(image_ids)]
    if len(image_ids) != len(results):
        raise ValueError(
            f"{len(results)} results need {len(results)} image ids, got {len(image_ids)}"
        )
    out = []
    for result, image_id in zip(results, image_ids):
        names = result["label_names"]
        # detectron2's conversion (xywh boxes, category_id = the class index), then ids and labels
        for r in instances_to_coco_json(result["instances"].to("cpu"), int(image_id)):
            label = r["category_id"]
            r["category_id"] = int(category_ids[label]) if category_ids else label + 1
            r["label"] = names[label]
            out.append(r)
    return out


def _phrase_key(phrase) -> Union[str, tuple]:
    if isinstance(phrase, str):
        return phrase
    try:
        return tuple(phrase)
    except TypeError:
        raise ValueError(f"phrase {phrase!r} is neither a str nor a (start, end) pair") from None
