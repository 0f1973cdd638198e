"""Finding, converting, caching and loading the weights of model-zoo entries and local files.

* A file in fiber_d2's layout (``backbone.*`` / ``head.*`` keys; ``.pth`` written by training or
  ``tools/convert_fiber_checkpoint.py``, or ``.safetensors``) loads directly.
* A file in the original layout (``fusion_backbone.*`` / ``rpn.*`` or ``vit_model.*`` /
  ``text_transformer.*``, optionally under ``module.``) is converted in memory with
  :mod:`fiber_d2.checkpoint.convert` and cached next to it as ``<file>.fiber_d2.safetensors`` (under
  ``FIBER_D2_HOME/converted/`` when its folder is read-only); the next load reads the cache.
* A checkpoint of a different architecture (shape mismatches, most tensors missing) or a file that
  cannot be read is one ``ValueError`` line naming the file.

Everything is read with ``torch.load(weights_only=True)`` or safetensors; nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Dict, Tuple

import torch
from torch import nn

from ..checkpoint.checkpointer import load_state_dict_file, summarize_keys
from .catalog import ZooEntry

__all__ = [
    "fiber_d2_home",
    "repo_root",
    "weights_path",
    "checkpoint_layout",
    "load_weights",
]

logger = logging.getLogger(__name__)

# Shape mismatches tolerated when loading: the frozen, unused cls_logits conv is sized by
# DYHEAD.NUM_CLASSES, which differs between the released configs (spec §5.1 loader skips it too).
_TOLERATED_MISMATCH = ("head.cls_logits.",)
# A checkpoint that fills fewer than this share of the model's tensors belongs to another model.
_MIN_FILLED = 0.5


def fiber_d2_home() -> Path:
    """``$FIBER_D2_HOME``, default ``~/.cache/fiber_d2`` (not created here)."""
    return Path(os.environ.get("FIBER_D2_HOME") or Path.home() / ".cache" / "fiber_d2").expanduser()


def repo_root() -> Path:
    """The directory holding ``configs/`` (the repository root, next to the package)."""
    return Path(__file__).resolve().parents[2]


def weights_path(e: ZooEntry) -> Path:
    """The local file of a model-zoo entry.

    Searched: ``$FIBER_D2_HOME/<folder>/<file_name>``, then the entry's repository-relative
    ``local_copies`` (e.g. ``make demo``'s output).

    Raises:
        FileNotFoundError: one line naming the file to fetch and where to put it.
    """
    if not e.released:
        raise FileNotFoundError(
            f"model-zoo entry {e.name!r} has no released weights: {e.how_to_get}"
        )
    target = fiber_d2_home() / e.folder / e.file_name
    candidates = [target] + [repo_root() / p for p in e.local_copies]
    for path in candidates:
        if path.is_file():
            return path
    source = f"download {e.url}" if e.url else e.how_to_get
    also = (
        f" (or {', '.join(str(repo_root() / p) for p in e.local_copies)})" if e.local_copies else ""
    )
    raise FileNotFoundError(
        f"model-zoo entry {e.name!r} needs {e.file_name}: {source}, and put it at {target}{also}; "
        "set FIBER_D2_HOME to use another folder"
    )


def checkpoint_layout(state: Dict[str, torch.Tensor]) -> str:
    """ "fiber_d2", "original-fine" or "original-coarse" from the key names.

    Raises:
        ValueError: keys of neither layout.
    """
    keys = [k[len("module.") :] if k.startswith("module.") else k for k in map(str, state)]
    if any(k.startswith(("fusion_backbone.", "rpn.")) for k in keys):
        return "original-fine"
    if any(k.startswith(("vit_model.", "text_transformer.")) for k in keys):
        return "original-coarse"
    if any(k.startswith(("backbone.", "head.")) for k in keys):
        return "fiber_d2"
    raise ValueError(f"keys of neither fiber_d2 nor the original FIBER, e.g. {keys[:3]}")


def _cache_path(path: Path) -> Path:
    beside = path.with_name(path.name + ".fiber_d2.safetensors")
    if os.access(path.parent, os.W_OK):
        return beside
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    return fiber_d2_home() / "converted" / f"{path.name}.{digest}.fiber_d2.safetensors"


def _read(path: Path) -> Dict[str, torch.Tensor]:
    try:
        loaded = load_state_dict_file(str(path))
    except (ValueError, RuntimeError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(
            f"cannot read weights file {path} (truncated or not a checkpoint): {first}"
        ) from None
    from ..checkpoint.convert import unwrap_state_dict

    try:
        state, _ = unwrap_state_dict(loaded)
    except TypeError as e:
        raise ValueError(f"{path}: {e}") from None
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _convert(path: Path, state: Dict[str, torch.Tensor], layout: str, model: nn.Module) -> dict:
    from ..checkpoint.convert import convert_coarse_state_dict, convert_fine_state_dict

    model_state = model.state_dict()
    is_detector = any(k.startswith("backbone.bottom_up.") for k in model_state)
    if layout == "original-fine":
        if not is_detector:
            raise ValueError(
                f"{path} is a fine-grained (detector) checkpoint; the model is not FIBER"
            )
        converted, report = convert_fine_state_dict(state, model_state=model_state)
    else:
        target = "fine" if is_detector else "coarse"
        converted, report = convert_coarse_state_dict(state, target=target, model_state=model_state)
    wrong = [m for m in report.shape_mismatches if not m[1].startswith(_TOLERATED_MISMATCH)]
    if wrong:
        _, key, got, want = wrong[0]
        raise ValueError(
            f"{path} does not fit this model ({len(wrong)} tensors of another shape, e.g. {key}: "
            f"file {tuple(got)}, model {tuple(want)}); is it the checkpoint of another config?"
        )
    return converted


def _cache(path: Path, converted: Dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    cache = _cache_path(path)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp")
        save_file({k: v.detach().clone().contiguous() for k, v in converted.items()}, str(tmp))
        os.replace(tmp, cache)
        logger.info("converted %s once; cached as %s", path, cache)
    except OSError as e:
        logger.warning("could not cache the converted weights at %s: %s", cache, e)


def _check_fit(
    path: Path, state: Dict[str, torch.Tensor], model: nn.Module
) -> Dict[str, torch.Tensor]:
    """Drop tolerated mismatches; raise for another architecture."""
    model_state = model.state_dict()
    wrong = [
        (k, tuple(v.shape), tuple(model_state[k].shape))
        for k, v in state.items()
        if k in model_state and tuple(v.shape) != tuple(model_state[k].shape)
    ]
    bad = [w for w in wrong if not w[0].startswith(_TOLERATED_MISMATCH)]
    if bad:
        k, got, want = bad[0]
        raise ValueError(
            f"{path} does not fit this model ({len(bad)} tensors of another shape, e.g. {k}: "
            f"file {got}, model {want}); is it the checkpoint of another config?"
        )
    filled = sum(k in state for k in model_state)
    if filled < _MIN_FILLED * len(model_state):
        missing = [k for k in model_state if k not in state]
        raise ValueError(
            f"{path} fills only {filled} of the model's {len(model_state)} tensors (missing: "
            f"{summarize_keys(missing, 1)}); is it the checkpoint of another model?"
        )
    for k, got, want in wrong:
        logger.info("skipped %s: file shape %s, model shape %s", k, got, want)
    return {
        k: v for k, v in state.items() if (k, tuple(v.shape)) not in {(w[0], w[1]) for w in wrong}
    }


def load_weights(model: nn.Module, path: str | os.PathLike) -> Tuple[list, list]:
    """Load a local weights file of either layout into ``model`` (see the module docstring).

    Args:
        model: a built ``FIBER`` or ``FIBERCoarse`` model.
        path: a ``.pth`` / ``.pt`` / ``.ckpt`` / ``.safetensors`` file.

    Returns:
        ``(missing, unexpected)`` keys of the final ``load_state_dict``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable / truncated file, unknown layout, another architecture.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    cache = _cache_path(path)
    if cache.is_file() and cache.stat().st_mtime >= path.stat().st_mtime:
        logger.info("loading %s (converted from %s)", cache, path)
        state = _read(cache)
    else:
        state = _read(path)
        try:
            layout = checkpoint_layout(state)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        if layout != "fiber_d2":
            state = _convert(path, state, layout, model)
            _check_fit(path, state, model)
            _cache(path, state)
        elif any(k.startswith(("backbone.image_tower.", "backbone.text_tower.")) for k in state):
            # a fiber_d2 coarse-stage file loaded into the detector: the checkpointer's hand-off
            from ..checkpoint.checkpointer import _reroot_coarse

            state = _reroot_coarse(state, set(model.state_dict()))
    state = _check_fit(path, state, model)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys:
        logger.info(
            "%d model tensors not in %s (kept as initialised): %s",
            len(result.missing_keys),
            path.name,
            summarize_keys(result.missing_keys),
        )
    return list(result.missing_keys), list(result.unexpected_keys)
