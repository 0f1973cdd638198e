"""``FIBERCheckpointer``: detectron2's checkpointer with safe loading and the coarse-to-fine hand-off.

* ``.pth``/``.pt`` files load with ``torch.load(..., weights_only=True)``; ``.safetensors`` files through
  safetensors. Nothing is unpickled beyond tensors and plain containers.
* A coarse-stage checkpoint (``FIBERCoarse``: towers under ``backbone.``) loaded into the detector
  (towers under ``backbone.bottom_up.``) is re-rooted automatically, so ``MODEL.WEIGHTS`` can point at the
  coarse run's ``model_final.pth``. Keys the detector does not have (poolers, ITM/MLM heads, queues) are
  dropped; keys the coarse stage never had (FPN, head) keep their initialisation.
* Relative-position bias tables of another window (a coarse checkpoint fine-tuned at another resolution,
  coarse spec §5.1) are resized bicubically to the model's window; the index buffers are recomputed by
  the model.
* Missing / unexpected keys are summarised per module in one log line each, not one line per tensor.
"""

from __future__ import annotations

import logging
import os
from collections import Counter

import torch
from detectron2.checkpoint import DetectionCheckpointer

__all__ = ["FIBERCheckpointer", "load_state_dict_file", "summarize_keys"]

logger = logging.getLogger(__name__)

_TOWERS = ("image_tower.", "text_tower.")


def load_state_dict_file(path: str) -> dict:
    """Load a checkpoint file safely (weights_only pickle or safetensors).

    Raises:
        FileNotFoundError / ValueError naming the file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return {"model": load_file(path)}
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise ValueError(f"cannot load checkpoint {path} with weights_only=True: {e}") from None


def summarize_keys(keys: list[str], depth: int = 2) -> str:
    """'prefix(count), ...' grouping keys by their first ``depth`` name components."""
    counts = Counter(".".join(k.split(".")[:depth]) for k in keys)
    return ", ".join(f"{p}({n})" for p, n in sorted(counts.items()))


def _reroot_coarse(state: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """Move ``backbone.<tower>.*`` to ``backbone.bottom_up.<tower>.*`` when the model expects that."""
    needs = any(k.startswith("backbone.bottom_up.image_tower.") for k in model_keys)
    has_coarse = any(k.startswith(("backbone.image_tower.", "backbone.text_tower.")) for k in state)
    if not (needs and has_coarse):
        return state
    out = {}
    for k, v in state.items():
        if k.startswith("backbone.") and k[len("backbone.") :].startswith(_TOWERS):
            out["backbone.bottom_up." + k[len("backbone.") :]] = v
        elif k in model_keys:
            out[k] = v
    dropped = [k for k in state if not k.startswith("backbone.") and k not in model_keys]
    logger.info(
        "Loading a coarse-stage checkpoint into the detector: %d backbone tensors re-rooted under "
        "backbone.bottom_up; %d coarse-only tensors dropped (%s)",
        sum(k.startswith("backbone.bottom_up.") for k in out),
        len(dropped),
        summarize_keys(dropped, 1),
    )
    return out


def _resize_position_tables(state: dict, model_state: dict) -> dict:
    """Resize ``*relative_position_bias_table`` tensors whose window differs from the model's."""
    from .convert import resize_relative_position_table

    resized = 0
    for key, value in state.items():
        target = model_state.get(key)
        if not key.endswith("relative_position_bias_table") or target is None:
            continue
        if value.shape != target.shape and value.dim() == 2 and value.shape[1] == target.shape[1]:
            state[key] = resize_relative_position_table(value, target.shape[0])
            resized += 1
    if resized:
        logger.info("Resized %d relative-position tables to the model's window", resized)
    return state


class FIBERCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer with weights_only loading and the coarse-to-fine hand-off."""

    def _load_file(self, filename: str) -> dict:
        if filename.endswith((".pth", ".pt", ".safetensors")):
            loaded = load_state_dict_file(filename)
            if "model" not in loaded:
                loaded = {"model": loaded}
            return loaded
        return super()._load_file(filename)

    def _load_model(self, checkpoint: dict):
        model_state = self.model.state_dict()
        checkpoint["model"] = _reroot_coarse(checkpoint["model"], set(model_state))
        checkpoint["model"] = _resize_position_tables(checkpoint["model"], model_state)
        return super()._load_model(checkpoint)

    def _log_incompatible_keys(self, incompatible) -> None:
        if incompatible.missing_keys:
            logger.info(
                "%d model tensors not in the checkpoint (kept as initialised): %s",
                len(incompatible.missing_keys),
                summarize_keys(incompatible.missing_keys),
            )
        if incompatible.unexpected_keys:
            logger.info(
                "%d checkpoint tensors not used by the model: %s",
                len(incompatible.unexpected_keys),
                summarize_keys(incompatible.unexpected_keys),
            )
        for key, shape_ckpt, shape_model in incompatible.incorrect_shapes:
            logger.warning(
                "Skipped %s: checkpoint shape %s, model shape %s", key, shape_ckpt, shape_model
            )
