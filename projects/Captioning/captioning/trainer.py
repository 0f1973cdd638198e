"""``CaptionTrainer``: FIBERTrainer with the caption mapper, reference-carrying training records and
the caption evaluator (used by ``train_net.py`` and the shapes runner)."""

from __future__ import annotations

from collections import OrderedDict

from detectron2.config import CfgNode

from fiber_d2.engine.setup import ConfigError, load_config, require_at_least_one
from fiber_d2.engine.trainer import FIBERTrainer

from .config import add_captioning_config
from .data import build_caption_mapper, caption_train_records
from .decoding import DECODINGS
from .evaluator import CaptionEvaluator, metric_availability

__all__ = ["CaptionTrainer", "load_captioning_config"]


class CaptionTrainer(FIBERTrainer):
    """See the module docstring."""

    @classmethod
    def build_mapper(cls, cfg, is_train: bool):
        return build_caption_mapper(cfg, is_train)

    @classmethod
    def train_records(cls, cfg):
        return caption_train_records(cfg)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name: str, output_folder=None):
        output_folder = cls.inference_folder(cfg, dataset_name, output_folder)
        return CaptionEvaluator(dataset_name, output_folder, cfg.CAPTION.METRICS)

    def train(self):
        """Train; returns the last evaluation's results."""
        super().train()
        return getattr(self, "_last_eval_results", OrderedDict())


def load_captioning_config(config_file: str | None, opts: list | None = None) -> CfgNode:
    """fiber_d2's and the project's defaults, a yaml file and ``KEY VALUE`` overrides.

    Raises:
        ConfigError: missing file, unknown key, malformed overrides, unknown stage, decoding
            or metric, a beam, length, sample count or GOLD update period below 1, a CIDEr mix or
            GOLD weight bound outside [0, 1].
    """
    cfg = load_config(config_file, opts, extra_defaults=(add_captioning_config,))
    if cfg.CAPTION.STAGE not in ("mle", "gold", "cider"):
        raise ConfigError(f"CAPTION.STAGE must be mle, gold or cider, got {cfg.CAPTION.STAGE!r}")
    if cfg.CAPTION.DECODING not in DECODINGS:
        raise ConfigError(
            f"CAPTION.DECODING must be one of {', '.join(DECODINGS)}, got {cfg.CAPTION.DECODING!r}"
        )
    require_at_least_one(
        cfg,
        "CAPTION.BEAM_SIZE",
        "CAPTION.MAX_LENGTH",
        "CAPTION.CIDER_SAMPLES",
        "CAPTION.GOLD_UPDATE_PERIOD",
    )
    for key in ("CIDER_ALPHA", "GOLD_MIN_WEIGHT"):
        if not 0.0 <= cfg.CAPTION[key] <= 1.0:
            raise ConfigError(f"CAPTION.{key} must be between 0 and 1, got {cfg.CAPTION[key]}")
    try:
        metric_availability(cfg.CAPTION.METRICS)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return cfg
