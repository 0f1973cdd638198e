"""Config loading and validation for the command-line tools (train_net, demo, benchmark, analyze_model).

Every user mistake that can be caught before a run starts (missing or misspelled config file or key,
unregistered dataset, missing weights) raises :class:`ConfigError` with one line naming the culprit, before
anything is written to ``OUTPUT_DIR``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

from detectron2.config import CfgNode, get_cfg
from detectron2.data import DatasetCatalog

from ..config import add_fiber_config
from .trainer import is_coarse_stage

__all__ = ["ConfigError", "load_config", "validate_config", "tool_image_size"]

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A one-line, user-facing configuration error."""


def load_config(
    config_file: str | None,
    opts: list[str] | None = None,
    *,
    extra_defaults: Sequence[Callable[[CfgNode], CfgNode]] = (),
) -> CfgNode:
    """Build a detectron2 config with fiber_d2's defaults, a yaml file and ``KEY VALUE`` overrides.

    Args:
        config_file: path of a yaml (``_BASE_`` inheritance allowed), or None/"" for the defaults.
        opts: flat list ``[KEY, VALUE, KEY, VALUE, ...]``.
        extra_defaults: functions adding a project's keys (e.g. ``add_retrieval_config``), applied
            after :func:`add_fiber_config`.

    Returns:
        the merged (not yet frozen) config.

    Raises:
        ConfigError: missing file, unknown key, malformed overrides.
    """
    cfg = add_fiber_config(get_cfg())
    for add_defaults in extra_defaults:
        cfg = add_defaults(cfg)
    if config_file:
        if not os.path.isfile(config_file):
            raise ConfigError(f"config file not found: {config_file}")
        try:
            cfg.merge_from_file(config_file)
        except KeyError as e:
            raise ConfigError(f"{config_file}: {_key_error_text(e)}") from None
    opts = list(opts or [])
    if len(opts) % 2:
        raise ConfigError(f"overrides must be KEY VALUE pairs, got an odd list: {opts}")
    try:
        cfg.merge_from_list(opts)
    except (KeyError, AssertionError) as e:
        raise ConfigError(f"command-line override: {_key_error_text(e)}") from None
    except ValueError as e:
        raise ConfigError(f"command-line override: {e}") from None
    return cfg


def _key_error_text(e: Exception) -> str:
    text = e.args[0] if e.args else str(e)
    return f"{text} (check the spelling against fiber_d2/config.py)"


def validate_config(cfg: CfgNode, *, training: bool) -> None:
    """Check names and paths the run will need, before it writes anything.

    Raises:
        ConfigError: an unregistered dataset or a missing local weights file.
    """
    names = list(cfg.DATASETS.TEST)
    if training:
        names += list(cfg.DATASETS.TRAIN)
    registered = set(DatasetCatalog.list())
    for name in names:
        if name not in registered:
            raise ConfigError(
                f"dataset '{name}' is not registered; register it (see README 'Datasets') "
                f"or pick one of fiber_d2's: {', '.join(sorted(n for n in registered if 'shapes' in n))}"
            )
    weights = cfg.MODEL.WEIGHTS
    if weights and "://" not in weights and not os.path.isfile(weights):
        raise ConfigError(f"MODEL.WEIGHTS file not found: {weights}")
    if cfg.MODEL.SWIN.WEIGHTS and not os.path.isfile(cfg.MODEL.SWIN.WEIGHTS):
        raise ConfigError(f"MODEL.SWIN.WEIGHTS file not found: {cfg.MODEL.SWIN.WEIGHTS}")
    if cfg.MODEL.DEVICE == "cpu" and cfg.SOLVER.AMP.ENABLED:
        # detectron2's AMPTrainer needs CUDA; FIBER's AMP recipes still run (in fp32) on the CPU.
        logger.warning("SOLVER.AMP.ENABLED is ignored on the CPU; training in fp32.")
        was_frozen = cfg.is_frozen()
        cfg.defrost()
        cfg.SOLVER.AMP.ENABLED = False
        if was_frozen:
            cfg.freeze()


def tool_image_size(cfg: CfgNode, height: int = 0, width: int = 0) -> tuple[int, int]:
    """(H, W) of the synthetic images of the benchmark and analysis tools.

    Args:
        cfg: the config; its stage gives the default (coarse: ``INPUT.IMAGE_SIZE`` square,
            fine: ``INPUT.MIN_SIZE_TEST`` x ``INPUT.MAX_SIZE_TEST``).
        height, width: explicit sizes (``--height`` / ``--width``); 0 takes the default.

    Raises:
        ValueError: a non-positive size.
    """
    if is_coarse_stage(cfg):
        default = (cfg.INPUT.IMAGE_SIZE, cfg.INPUT.IMAGE_SIZE)
    else:
        default = (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    height, width = height or default[0], width or default[1]
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got --height {height} --width {width}")
    return height, width
