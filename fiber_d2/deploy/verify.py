"""Check an export against the eager detector on image sizes and prompts it was not traced on.

:func:`verify_export` runs :class:`~fiber_d2.deploy.graph.ExportableFIBER` (eager) and an exported
runner on the same preprocessed inputs, one per (image, prompt) pair, and reports whether they give
the same detections (count and labels per image, boxes and scores within tolerances). Used by
``tools/deploy/export_model.py --verify`` on real weights; the tests check the tiny model.
"""

from __future__ import annotations

import logging
from typing import List, Sequence

import numpy as np
import torch

from ..predictor import FIBERPredictor, split_prompt
from .graph import ExportableFIBER
from .runtime import ExportedPredictor, graph_inputs

__all__ = ["BOX_ATOL", "SCORE_ATOL", "compare_detections", "verify_export"]

logger = logging.getLogger(__name__)

BOX_ATOL = 1e-4
"""Largest box coordinate difference (pixels of the resized image) accepted as the same."""
SCORE_ATOL = 1e-5
"""Largest score difference accepted as the same."""


def _match(got: tuple, ref: tuple) -> tuple[bool, float, float]:
    """Pair one image's detections: each reference detection (best first) with the unused one of
    the same label whose box is nearest. Matching by box rather than by rank makes the comparison
    immune to near-tied scores (a random-init model has many) swapping places.

    Returns:
        (every detection paired, max box difference, max score difference over the pairs).
    """
    g_boxes, g_scores, g_labels = got
    r_boxes, r_scores, r_labels = ref
    if len(g_labels) != len(r_labels):
        return False, 0.0, 0.0
    free = np.ones(len(g_labels), dtype=bool)
    box_diff = score_diff = 0.0
    for j in np.argsort(-r_scores, kind="stable"):
        diffs = np.abs(g_boxes - r_boxes[j]).max(axis=1) if len(g_labels) else np.zeros(0)
        diffs = np.where(free & (g_labels == r_labels[j]), diffs, np.inf)
        k = int(np.argmin(diffs))
        if not np.isfinite(diffs[k]):
            return False, box_diff, score_diff
        free[k] = False
        box_diff = max(box_diff, float(diffs[k]))
        score_diff = max(score_diff, float(abs(g_scores[k] - r_scores[j])))
    return True, box_diff, score_diff


def compare_detections(got: Sequence, ref: Sequence) -> dict:
    """Compare two graph outputs ``(batch_index, boxes, scores, labels)``.

    Returns:
        dict with ``detections`` (reference count), ``same_detections`` (per image the same count
        and, pairing each reference detection with the nearest box of its label, the same labels),
        ``max_box_diff``, ``max_score_diff`` (over the pairs) and ``ok`` (same detections within
        :data:`BOX_ATOL` / :data:`SCORE_ATOL`).
    """
    got = [np.asarray(torch.as_tensor(np.asarray(x)).detach()).astype(np.float64) for x in got]
    ref = [np.asarray(torch.as_tensor(np.asarray(x)).detach()).astype(np.float64) for x in ref]
    images = int(max(got[0].max(initial=-1), ref[0].max(initial=-1))) + 1
    same, box_diff, score_diff = True, 0.0, 0.0
    for i in range(images):
        paired, boxes, scores = _match(
            tuple(x[got[0] == i] for x in got[1:]), tuple(x[ref[0] == i] for x in ref[1:])
        )
        same &= paired
        box_diff, score_diff = max(box_diff, boxes), max(score_diff, scores)
    ok = same and box_diff <= BOX_ATOL and score_diff <= SCORE_ATOL
    return {
        "detections": int(len(ref[0])),
        "same_detections": bool(same),
        "max_box_diff": box_diff,
        "max_score_diff": score_diff,
        "ok": bool(ok),
    }


def verify_export(
    predictor: FIBERPredictor,
    runner: ExportedPredictor,
    images: List[np.ndarray],
    prompts: List[str],
) -> List[dict]:
    """Eager vs exported detections for every (image, prompt) pair, one image per call.

    Args:
        predictor: the eager predictor whose model was exported (its preprocessing is used).
        runner: the exported model's runner.
        images: BGR uint8 images (H, W, 3), resized by the predictor as in deployment.
        prompts: detection prompts ("cat. dog"), each encoded as one chunk.

    Returns:
        one :func:`compare_detections` record per pair, plus ``padded_size`` and ``text_len``.
    """
    wrapper = ExportableFIBER(predictor.model).eval()
    div = predictor.model.backbone.size_divisibility
    mean = predictor.model.pixel_mean.flatten().tolist()
    std = predictor.model.pixel_std.flatten().tolist()
    results = []
    for image in images:
        record = predictor.preprocess_image(image)
        for prompt in prompts:
            text = predictor.encode(split_prompt(prompt, predictor.separator))
            if text["input_ids"].dim() != 1:
                raise ValueError(
                    f"prompt {prompt!r} needs several chunks; verify with shorter ones"
                )
            rec = dict(record, **{k: text[k] for k in ("input_ids", "attention_mask")})
            rec["label_token_map"] = text["label_token_map"]
            # the text cut to the prompt (rounded up) even with INPUT.PAD_TO_MAX_QUERY_LEN: the two
            # prompts then run at two text lengths (outputs on real tokens do not depend on it)
            inputs = graph_inputs([rec], mean, std, div, pad_to_max_query_len=False)
            runner.check_inputs(inputs[0], inputs[2])
            with torch.no_grad():
                ref = wrapper(*(t.to(predictor.model.device) for t in inputs))
            result = compare_detections(runner.run_graph(*inputs), [r.cpu() for r in ref])
            result["padded_size"] = list(inputs[0].shape[-2:])
            result["text_len"] = int(inputs[2].shape[1])
            logger.info("verify: %s", result)
            results.append(result)
    return results
