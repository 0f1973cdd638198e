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

    predictor = FIBERPredictor(cfg)
    out = predictor(image_bgr, ["red circle", "blue square"])
    out = predictor(image_bgr, "a red circle left of a blue square", phrases=["red circle"])
    outs = predictor([img1, img2], [["circle"], "a blue square"])
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.modeling import META_ARCH_REGISTRY, build_model
from torch import nn

from .checkpoint.checkpointer import load_model_weights
from .data.mapper import encode_category_prompts
from .modeling.meta_arch.fiber import FIBER
from .text import build_tokenizer, char_spans_to_positive_map, tokenize

__all__ = ["FIBERPredictor", "split_prompt"]

logger = logging.getLogger(__name__)

ImageLike = Union[np.ndarray, str, os.PathLike]
Prompt = Union[str, Sequence[str]]
Phrase = Union[str, Sequence[int]]

_CACHE_SIZE = 32


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
        max_query_len: int = 256,
        separator: str = ". ",
        chunk_size: int = -1,
    ):
        """
        Args:
            model: a :class:`FIBER` detector (put in eval mode here).
            tokenizer: a fast tokenizer, or a name for :func:`fiber_d2.text.build_tokenizer`.
            min_size_test, max_size_test: test-time ``ResizeShortestEdge`` sizes.
            input_format: channel order the model expects ("BGR" or "RGB"); inputs are BGR.
            max_query_len: padded token length T (``MAX_QUERY_LEN``).
            separator: joins category names (``DATASETS.SEPARATION_TOKENS``).
            chunk_size: names per prompt chunk (``TEST.CHUNKED_EVALUATION``); <= 0: as many as
                fit in ``max_query_len`` tokens.
        """
        if not isinstance(model, FIBER):
            raise ValueError(
                f"FIBERPredictor needs a FIBER detector, got {type(model).__name__} "
                "(only the fine-grained detector predicts boxes)"
            )
        if input_format not in ("BGR", "RGB"):
            raise ValueError(f"INPUT.FORMAT must be BGR or RGB, got {input_format!r}")
        self.model = model.eval()
        self.tokenizer = build_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        self.aug = T.ResizeShortestEdge([min_size_test, min_size_test], max_size_test)
        self.input_format = input_format
        self.max_query_len = max_query_len
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
            "max_query_len": cfg.MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN,
            "separator": cfg.DATASETS.SEPARATION_TOKENS,
            "chunk_size": cfg.TEST.CHUNKED_EVALUATION,
        }

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
    def preprocess_image(self, image: ImageLike) -> dict:
        """Read (if a path), convert and resize one image.

        Args:
            image: BGR uint8 array (H, W, 3), or an image file path.

        Returns:
            dict with ``image`` uint8 Tensor (3, h, w) in the model's format (resized) and the
            original ``height`` / ``width``.
        """
        if isinstance(image, (str, os.PathLike)):
            path = os.fspath(image)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"image not found: {path}")
            array = utils.read_image(path, format=self.input_format)
        else:
            if not isinstance(image, np.ndarray):
                raise ValueError(f"image must be a numpy array or a path, got {type(image)}")
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(
                    f"image must be a BGR uint8 array (H, W, 3), got {image.dtype} {image.shape}"
                )
            array = image[:, :, ::-1] if self.input_format == "RGB" else image
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
    ) -> Union[dict, List[dict]]:
        """Detect the prompt's labels in one image, or in a batch of images.

        Args:
            images: one BGR uint8 array (H, W, 3) or path; or a list of N of them (batch).
            prompts: single image: a category-name list or a caption; batch: a list of N such
                prompts (one per image), or one caption str shared by all images.
            phrases: single image: the caption's phrases (see :meth:`encode`); batch: a list of
                N such lists (None entries allowed), or None.

        Returns:
            single image: ``{"instances": Instances, "label_names": list[str], "caption": ...}``
            with ``pred_boxes`` (xyxy, original image size), ``scores`` and ``pred_classes``
            (index into ``label_names``); batch: a list of N such dicts.
        """
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
            return self._predict(list(images), list(prompts), phrases)
        return self._predict([images], [prompts], [phrases])[0]

    def _predict(self, images, prompts, phrases) -> List[dict]:
        texts = [self.encode(p, ph) for p, ph in zip(prompts, phrases)]
        inputs = []
        for image, text in zip(images, texts):
            x = self.preprocess_image(image)
            x.update({k: text[k] for k in ("input_ids", "attention_mask", "label_token_map")})
            inputs.append(x)
        with torch.no_grad():
            outputs = self.model(inputs)
        return [
            {
                "instances": out["instances"],
                "label_names": list(text["label_names"]),
                "caption": text["caption"],
            }
            for out, text in zip(outputs, texts)
        ]


def _phrase_key(phrase) -> Union[str, tuple]:
    if isinstance(phrase, str):
        return phrase
    try:
        return tuple(phrase)
    except TypeError:
        raise ValueError(f"phrase {phrase!r} is neither a str nor a (start, end) pair") from None
