"""``FIBERPredictor``: run the grounding detector on raw images with free-form prompts.

In the spirit of detectron2's ``DefaultPredictor``: it builds the model in eval mode, loads
``MODEL.WEIGHTS``, resizes with ``FIBERResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST)`` (the
original's output sizes) and returns detectron2 outputs at the original image size. Unlike it, every call also takes a text prompt:

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
The prompt, image and output handling behind it are plain functions in
:mod:`fiber_d2.inference` (prompts, images, outputs).
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_model
from torch import nn

from .checkpoint.checkpointer import load_model_weights
from .checkpoint.safe_io import CheckpointError
from .data.resize import FIBERResizeShortestEdge
from .engine.setup import check_device_available
from .inference.images import ImageLike, image_to_array
from .inference.outputs import (  # nms_keep: still importable from here
    check_selection,
    check_threshold,
    nms_keep,  # noqa: F401
    select_detections,
    to_coco_json,
)
from .inference.prompts import (
    Phrase,
    Prompt,
    encode_caption,
    encode_names,
    prompt_key,
    split_prompt,
)
from .modeling.meta_arch.fiber import FIBER
from .text import build_tokenizer

__all__ = ["FIBERPredictor", "split_prompt", "to_coco_json", "resolve_dtype"]

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
            min_size_test, max_size_test: test-time resize
                (:class:`~fiber_d2.data.resize.FIBERResizeShortestEdge`) sizes.
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
        check_device_available(device, f"device {device!r}")  # a ValueError (ConfigError)
        self.model = model.eval() if device is None else model.to(device).eval()
        self.tokenizer = build_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        self.aug = FIBERResizeShortestEdge([min_size_test, min_size_test], max_size_test)
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
        assumed = False  # the architecture defaulted for a local file
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
            assumed = not config
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
        check_device_available(device, f"device {device!r}")
        cfg.MODEL.DEVICE = device
        cfg.MODEL.WEIGHTS = ""
        model = build_model(cfg)
        try:
            model_zoo.load_weights(model, weights, inference=True)
        except ValueError as e:  # CheckpointError and the layout check's
            if not assumed:
                raise
            raise CheckpointError(
                f"{e} (no config was given, so fiber-b/coco's FIBER-B detector was assumed: name "
                "the config the file was trained with, config= / --config-file)"
            ) from None
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
        key = prompt_key(prompt, phrases)
        if key not in self._cache:
            if isinstance(prompt, str):
                self._cache[key] = encode_caption(
                    self.tokenizer, prompt, phrases, max_query_len=self.max_query_len
                )
            else:
                self._cache[key] = encode_names(
                    self.tokenizer,
                    list(prompt),
                    max_query_len=self.max_query_len,
                    separator=self.separator,
                    chunk_size=self.chunk_size,
                )
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key]

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
        return image_to_array(image, self.input_format, image_format)

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
        check_selection(threshold, class_agnostic_nms, max_detections)
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
            if phrases is not None and not isinstance(phrases, (list, tuple)):
                raise ValueError(
                    f"phrases of a batch must be a list of {count} phrase lists (or None), got "
                    f"{phrases!r:.60}"
                )
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
            inst = select_detections(out["instances"], nms_threshold=self.nms_threshold, **post)
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

        check_threshold(threshold)
        array = self.read_image(image, image_format)
        rgb = array[:, :, ::-1] if self.input_format == "BGR" else array
        return draw_grounding(
            np.ascontiguousarray(rgb),
            result["instances"],
            result["label_names"],
            threshold,
            min_size=min_size,
        )


def _model_query_len(model: nn.Module) -> int:
    """The padded text length of the model's text tower (``MAX_QUERY_LEN`` within its positions)."""
    for module in model.modules():
        max_len = getattr(module, "max_len", None)
        if isinstance(max_len, int) and hasattr(module, "fused_layer_ids"):
            return max_len
    raise ValueError(f"cannot read the query length: {type(model).__name__} has no text tower")
