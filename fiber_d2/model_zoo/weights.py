"""Finding, converting, caching and loading the weights of model-zoo entries and local files.

* A file in fiber_d2's layout (``backbone.*`` / ``head.*`` keys; ``.pth`` written by training or
  ``tools/convert_fiber_checkpoint.py``, or ``.safetensors``) loads directly.
* A file in the original layout (``fusion_backbone.*`` / ``rpn.*`` or ``vit_model.*`` /
  ``text_transformer.*``, optionally under ``module.``) is converted in memory with
  :mod:`fiber_d2.checkpoint.convert` and cached next to it as ``<file>.fiber_d2.safetensors`` (under
  ``FIBER_D2_HOME/converted/`` when its folder is read-only); the next load reads the cache.
* A checkpoint of a different architecture (shape mismatches, most tensors missing) or a file that
  cannot be read is one ``ValueError`` line naming the file.

Reading, strict weights and the coarse-to-fine hand-off are :class:`FIBERCheckpointer`'s and the
conversion is :func:`fiber_d2.checkpoint.layout.convert_original` (the converter tool's): files are
read with ``torch.load(weights_only=True)``, safetensors or the numpy-only ``.pkl`` reader; nothing
is downloaded.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Dict, Tuple

from torch import Tensor, nn

from ..checkpoint.checkpointer import FIBERCheckpointer, load_state_dict_file
from ..checkpoint.layout import COARSE, FINE, convert_original, fiber_d2_layout, original_layout
from ..checkpoint.safe_io import save_checkpoint_file
from .catalog import ZooEntry

__all__ = [
    "fiber_d2_home",
    "repo_root",
    "source_checkout",
    "weights_path",
    "checkpoint_layout",
    "load_weights",
]

logger = logging.getLogger(__name__)

# Shape mismatches tolerated when loading: the frozen, unused cls_logits conv is sized by
# DYHEAD.NUM_CLASSES, which differs between the released configs (spec §5.1 loader skips it too).
_TOLERATED_MISMATCH = ("head.cls_logits.",)


def fiber_d2_home() -> Path:
    """``$FIBER_D2_HOME``, default ``~/.cache/fiber_d2`` (not created here)."""
    return Path(os.environ.get("FIBER_D2_HOME") or Path.home() / ".cache" / "fiber_d2").expanduser()


def source_checkout() -> Path | None:
    """The repository root when fiber_d2 runs from a source checkout (or ``pip install -e .``);
    None for a wheel install."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "configs" / "Base-FIBER.yaml").is_file() else None


def repo_root() -> Path:
    """The directory holding ``configs/``: the source checkout, else the package's own copy
    (``fiber_d2/model_zoo``, where ``setup.py`` puts ``configs/`` in a wheel)."""
    return source_checkout() or Path(__file__).resolve().parent


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
    checkout = source_checkout()
    local = [checkout / p for p in e.local_copies] if checkout else []
    for path in [target] + local:
        if path.is_file():
            return path
    source = f"download {e.url}" if e.url else e.how_to_get
    also = f" (or {', '.join(str(p) for p in local)})" if local else ""
    raise FileNotFoundError(
        f"model-zoo entry {e.name!r} needs {e.file_name}: {source}, and put it at {target}{also}; "
        "set FIBER_D2_HOME to use another folder"
    )


def checkpoint_layout(state: Mapping) -> str:
    """ "fiber_d2", "original-fine" or "original-coarse" from the key names.

    Raises:
        ValueError: keys of neither layout.
    """
    stage = original_layout(state)
    if stage is not None:
        return f"original-{stage}"
    if fiber_d2_layout(state):
        return "fiber_d2"
    keys = [str(k) for k in (state.get("model", state) if "model" in state else state)]
    raise ValueError(f"keys of neither fiber_d2 nor the original FIBER, e.g. {keys[:3]}")


def _cache_path(path: Path) -> Path:
    beside = path.with_name(path.name + ".fiber_d2.safetensors")
    if os.access(path.parent, os.W_OK):
        return beside
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    return fiber_d2_home() / "converted" / f"{path.name}.{digest}.fiber_d2.safetensors"


def _convert(path: Path, checkpoint: Mapping, stage: str, model: nn.Module) -> Dict[str, Tensor]:
    """The one conversion of original files (:func:`fiber_d2.checkpoint.layout.convert_original`);
    a file whose tensors do not fit the model is one line."""
    model_state = model.state_dict()
    is_detector = any(k.startswith("backbone.bottom_up.") for k in model_state)
    if stage == FINE and not is_detector:
        raise ValueError(f"{path} is a fine-grained (detector) checkpoint; the model is not FIBER")
    converted, report = convert_original(
        checkpoint, stage=stage, target=FINE if is_detector else COARSE, model_state=model_state
    )
    wrong = [m for m in report.shape_mismatches if not m[1].startswith(_TOLERATED_MISMATCH)]
    if wrong:
        _, key, got, want = wrong[0]
        raise ValueError(
            f"{path} does not fit this model ({len(wrong)} tensors of another shape, e.g. {key}: "
            f"file {tuple(got)}, model {tuple(want)}); is it the checkpoint of another config?"
        )
    return converted  # mismatched tensors are reported, never written


def _cache(path: Path, converted: Dict[str, Tensor]) -> Path | None:
    """Write the converted weights next to ``path`` (or under FIBER_D2_HOME); None on failure."""
    cache = _cache_path(path)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint_file(str(cache), converted, {"converted_from": str(path)})
    except OSError as e:
        logger.warning("could not cache the converted weights at %s: %s", cache, e)
        return None
    logger.info("converted %s once; cached as %s", path, cache)
    return cache


def load_weights(
    model: nn.Module, path: str | os.PathLike, *, inference: bool = False
) -> Tuple[list, list]:
    """Load a local weights file of either layout into ``model`` (see the module docstring).

    Reading, strict-weights checks and the coarse-to-fine hand-off are
    :class:`~fiber_d2.checkpoint.FIBERCheckpointer`'s; this adds the conversion cache.

    Args:
        model: a built ``FIBER`` or ``FIBERCoarse`` model.
        path: a ``.pth`` / ``.pt`` / ``.ckpt`` / ``.safetensors`` file.
        inference: the model is used as loaded (the predictor, :func:`get`): every head it
            predicts with must be in the file, where training may start from a file without the
            head its stage adds (a coarse-stage file given to the detector).

    Returns:
        ``(missing, unexpected)`` keys of the final ``load_state_dict``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable / truncated / unsafe file, unknown layout, another architecture.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    checkpointer = FIBERCheckpointer(model, partial_ok=False, inference=inference)
    cache = _cache_path(path)
    if cache.is_file() and cache.stat().st_mtime >= path.stat().st_mtime:
        logger.info("loading %s (converted from %s)", cache, path)
        incompatible = checkpointer.load_weights_file(str(cache))
    else:
        checkpoint = load_state_dict_file(str(path))
        try:
            layout = checkpoint_layout(checkpoint)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        if layout == "fiber_d2":
            incompatible = checkpointer.load_weights_file(str(path))
        else:
            converted = _convert(path, checkpoint, layout[len("original-") :], model)
            cached = _cache(path, converted)
            incompatible = (
                checkpointer.load_weights_file(str(cached))
                if cached is not None
                else checkpointer.load_weights_state({"model": converted}, str(path))
            )
    return list(incompatible.missing_keys), list(incompatible.unexpected_keys)
