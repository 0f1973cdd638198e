"""``fiber_d2.model_zoo``: the released FIBER checkpoints by name.

    from fiber_d2 import model_zoo
    cfg = model_zoo.get_config("fiber-b/coco")           # the fiber_d2 config it belongs with
    model = model_zoo.get("fiber-b/coco")                # built, weights loaded, eval mode
    model = model_zoo.get("fiber-b/coco", weights="~/Downloads/model_0072500.pth")

Files are looked up under ``$FIBER_D2_HOME/<name with '/' as '_'>/<original file name>``
(default ``~/.cache/fiber_d2``); nothing is downloaded. A missing file is one line naming the file to
fetch and where to put it. Original-layout files are converted in memory and cached next to
themselves as safetensors (see :mod:`fiber_d2.model_zoo.weights`). The table is
:data:`~fiber_d2.model_zoo.catalog.ENTRIES`; the README's "Model zoo" table is generated from it.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path
from typing import Optional

from .catalog import ENTRIES, ZooEntry, entry, markdown_table, names
from .weights import checkpoint_layout, fiber_d2_home, load_weights, repo_root, weights_path

__all__ = [
    "ENTRIES",
    "ZooEntry",
    "entry",
    "names",
    "markdown_table",
    "fiber_d2_home",
    "config_path",
    "get_config",
    "get_weights_path",
    "get",
    "load_weights",
    "checkpoint_layout",
]

logger = logging.getLogger(__name__)


def config_path(name: str) -> Path:
    """Absolute path of the config of entry ``name`` (resolved from the package, not the CWD).

    Raises:
        KeyError: unknown name (the known names are listed).
        FileNotFoundError: the config file is missing (a projects/ config in a wheel install).
    """
    path = repo_root() / entry(name).config
    if not path.is_file():
        where = (
            "the projects' configs and code ship with the source checkout, not with the installed "
            "package: use fiber_d2 from a clone"
            if entry(name).config.startswith("projects/")
            else "configs/ lives next to the package in a source checkout and inside it in a wheel"
        )
        raise FileNotFoundError(
            f"config {entry(name).config} of {name!r} not found under {repo_root()} ({where})"
        )
    return path


def _extra_defaults(e: ZooEntry):
    """Import the entry's project (registering its models) and return its config function."""
    if not e.extra_defaults:
        return ()
    project_dir, target = e.extra_defaults.split(":")
    package, _, func = target.partition(".")
    path = str(repo_root() / project_dir)
    if path not in sys.path:  # the project's own package, as its train_net.py does
        sys.path.insert(0, path)
    module = importlib.import_module(package)
    return (getattr(module, func),) if func else ()


def get_config(name: str, opts: Optional[list] = None):
    """The (unfrozen) detectron2 config of model-zoo entry ``name``, with ``KEY VALUE`` overrides.

    ``MODEL.WEIGHTS`` is left as the config has it; :func:`get` loads the entry's file itself.

    Raises:
        KeyError: unknown name (lists the known names).
    """
    from ..engine.setup import load_config

    e = entry(name)
    return load_config(str(config_path(name)), list(opts or []), extra_defaults=_extra_defaults(e))


def get_weights_path(name: str) -> Path:
    """The local weights file of entry ``name``.

    Raises:
        KeyError: unknown name; FileNotFoundError: one line saying which file to fetch and where.
    """
    return weights_path(entry(name))


def get(
    name: str,
    weights: Optional[str | os.PathLike] = None,
    *,
    device: Optional[str] = None,
    opts: Optional[list] = None,
):
    """Build entry ``name``'s model in eval mode with its weights loaded.

    Args:
        name: a model-zoo name (:func:`names`).
        weights: a local file to load instead of the entry's own (either layout); None: the
            entry's file under ``FIBER_D2_HOME`` (see :func:`get_weights_path`).
        device: "cpu", "cuda", ...; None: the config's ``MODEL.DEVICE``, or the CPU when CUDA is
            not available.
        opts: ``KEY VALUE`` config overrides.

    Returns:
        the model (``FIBER`` or ``FIBERCoarse``), in eval mode.

    Raises:
        KeyError: unknown name. FileNotFoundError: the weights file is missing (one line naming
        it and where to put it). ValueError: unreadable file or another architecture.
    """
    import torch
    from detectron2.modeling import build_model

    path = Path(weights).expanduser() if weights is not None else get_weights_path(name)
    cfg = get_config(name, opts)
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = device or (
        cfg.MODEL.DEVICE if torch.cuda.is_available() or cfg.MODEL.DEVICE == "cpu" else "cpu"
    )
    model = build_model(cfg)
    load_weights(model, path, inference=True)
    return model.eval()
