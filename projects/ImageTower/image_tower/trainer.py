"""``ImageTowerTrainer``: FIBERTrainer with the token-label mapper, the token accuracy evaluator and
the export of the trained tower (``OUTPUT_DIR/<IMAGE_TOWER.EXPORT_NAME>``, Swin ImageNet layout) at
the end of training; ``load_image_tower_config``: the defaults plus a yaml file."""

from __future__ import annotations

import logging
import os

from detectron2.config import CfgNode
from detectron2.engine import HookBase
from detectron2.utils import comm

from fiber_d2.checkpoint import save_checkpoint_file
from fiber_d2.engine.setup import ConfigError, load_config
from fiber_d2.engine.trainer import FIBERTrainer

from .config import add_image_tower_config
from .evaluator import TokenAccuracyEvaluator
from .mapper import TokenLabelMapper

__all__ = ["ImageTowerTrainer", "export_swin_weights", "load_image_tower_config"]

logger = logging.getLogger(__name__)


def export_swin_weights(model, path: str) -> str:
    """Write the image tower of ``model`` (an :class:`ImageTowerPretrain`, possibly DDP-wrapped) to
    ``path`` in the Swin ImageNet layout (``{"model": state_dict}``; a ``.safetensors`` path holds
    the bare tensors), for ``MODEL.SWIN.WEIGHTS``."""
    model = getattr(model, "module", model)
    tower = model.backbone.image_tower
    save_checkpoint_file(
        path, {k: v.detach().cpu() for k, v in tower.imagenet_state_dict().items()}
    )
    logger.info("Image tower written in the Swin ImageNet layout: %s", path)
    return path


class _ExportHook(HookBase):
    def __init__(self, path: str):
        self.path = path

    def after_train(self):
        if comm.is_main_process() and self.trainer.iter + 1 >= self.trainer.max_iter:
            export_swin_weights(self.trainer.model, self.path)


class ImageTowerTrainer(FIBERTrainer):
    """Trains :class:`image_tower.ImageTowerPretrain` on a detection dataset's boxes."""

    @classmethod
    def build_mapper(cls, cfg, is_train: bool):
        return TokenLabelMapper(cfg, is_train)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name: str, output_folder=None):
        return TokenAccuracyEvaluator(dataset_name)

    def build_hooks(self):
        path = os.path.join(self.cfg.OUTPUT_DIR, self.cfg.IMAGE_TOWER.EXPORT_NAME)
        return super().build_hooks() + [_ExportHook(path)]


def load_image_tower_config(config_file: str | None, opts: list | None = None) -> CfgNode:
    """fiber_d2's and the project's defaults, a yaml file and ``KEY VALUE`` overrides.

    Raises:
        ConfigError: missing file, unknown key, malformed overrides, an ``IMAGE_TOWER.EXPORT_NAME``
            that is not a file name, a negative ``IMAGE_TOWER.PRESENCE_WEIGHT``, no
            ``IMAGE_TOWER.LEVELS`` or one the tower does not output.
    """
    cfg = load_config(config_file, opts, extra_defaults=(add_image_tower_config,))
    name = cfg.IMAGE_TOWER.EXPORT_NAME
    if not name or os.path.basename(name) != name or name in (".", ".."):
        raise ConfigError(
            f"IMAGE_TOWER.EXPORT_NAME must be a file name (written in OUTPUT_DIR), got {name!r}"
        )
    if cfg.IMAGE_TOWER.PRESENCE_WEIGHT < 0:
        raise ConfigError(
            f"IMAGE_TOWER.PRESENCE_WEIGHT {cfg.IMAGE_TOWER.PRESENCE_WEIGHT} must be >= 0"
        )
    missing = [k for k in cfg.IMAGE_TOWER.LEVELS if k not in cfg.MODEL.SWIN.OUT_FEATURES]
    if missing or not cfg.IMAGE_TOWER.LEVELS:
        raise ConfigError(
            f"IMAGE_TOWER.LEVELS {list(cfg.IMAGE_TOWER.LEVELS)} must be outputs of the tower "
            f"(MODEL.SWIN.OUT_FEATURES {list(cfg.MODEL.SWIN.OUT_FEATURES)})"
        )
    return cfg
