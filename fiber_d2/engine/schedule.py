"""Epoch-based schedules: ``SOLVER.MAX_EPOCHS`` turned into iterations over the training set as loaded.

The original counts its fine-tuning schedules in epochs of the dataset it loaded, after its own
filtering (images without boxes, questions without an in-vocabulary answer), so the iteration count
depends on the annotation files (fine spec §9 item 6 leaves the sizes undetermined). With
``SOLVER.MAX_EPOCHS`` set, :func:`resolve_epoch_schedule` counts the records the training loader
will draw from (``FIBERTrainer.train_records``) and sets, before the run starts and before its
config is written to ``OUTPUT_DIR``:

* ``SOLVER.MAX_ITER`` by the original's rule of the recipe:

  - fine-grained (maskrcnn-benchmark): ``epochs x records // IMS_PER_BATCH``;
  - coarse-grained, the recipes with a per-device pass (``SOLVER.IMS_PER_DEVICE``; PyTorch
    Lightning): ``(per-process passes per epoch x epochs) // accumulation passes``, where a process
    draws ``ceil(records / processes)`` records per epoch in passes of its pass size (the last one
    short) (coarse spec §5.2);

* ``SOLVER.STEPS`` at ``round(f x MAX_ITER)`` for each ``f`` of ``SOLVER.STEP_FRACTIONS``;
* ``SOLVER.WARMUP_ITERS`` at ``int(SOLVER.WARMUP_FRACTION x MAX_ITER)`` when the fraction is set;

and ``SOLVER.MAX_EPOCHS`` to 0, so the config written to ``OUTPUT_DIR`` names the schedule the run
takes. A config counts in epochs or in iterations, not both: with ``MAX_EPOCHS`` set, ``MAX_ITER``
must be 0 (``validate_config``).
"""

from __future__ import annotations

import logging
import math

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog

from ..config import ConfigError
from ..data.datasets.common import serve_once
from .train_step import accumulation_steps

__all__ = ["epoch_schedule", "resolve_epoch_schedule"]

logger = logging.getLogger(__name__)


def epoch_schedule(cfg: CfgNode, num_records: int, world_size: int) -> dict:
    """``{"MAX_ITER": ..., "STEPS": ..., "WARMUP_ITERS": ...}`` of ``SOLVER.MAX_EPOCHS`` over
    ``num_records`` training records on ``world_size`` processes (see the module docstring).

    Raises:
        ConfigError: the schedule would have no iteration.
    """

    s = cfg.SOLVER
    epochs, batch = s.MAX_EPOCHS, s.IMS_PER_BATCH
    if s.IMS_PER_DEVICE > 0:
        passes = accumulation_steps(cfg, world_size)
        per_pass = batch // world_size // passes
        passes_per_epoch = math.ceil(math.ceil(num_records / world_size) / per_pass)
        max_iter = passes_per_epoch * epochs // passes
    else:
        max_iter = epochs * num_records // batch
    if max_iter < 1:
        raise ConfigError(
            f"SOLVER.MAX_EPOCHS {epochs} over {num_records} training record(s) at "
            f"SOLVER.IMS_PER_BATCH {batch} gives no iteration"
        )
    schedule = {"MAX_ITER": max_iter, "STEPS": tuple(s.STEPS), "WARMUP_ITERS": s.WARMUP_ITERS}
    if len(s.STEP_FRACTIONS):
        schedule["STEPS"] = tuple(round(f * max_iter) for f in s.STEP_FRACTIONS)
    if s.WARMUP_FRACTION > 0:
        schedule["WARMUP_ITERS"] = int(s.WARMUP_FRACTION * max_iter)
    return schedule


def resolve_epoch_schedule(cfg: CfgNode, trainer_cls, world_size: int) -> None:
    """With ``SOLVER.MAX_EPOCHS`` > 0, write :func:`epoch_schedule` over
    ``trainer_cls.train_records(cfg)`` into ``cfg`` (not frozen) and log it; otherwise nothing."""
    if cfg.SOLVER.MAX_EPOCHS <= 0:
        return
    # each set is read once: the records counted here are served again to the loader's first get
    loaded = {name: DatasetCatalog.get(name) for name in cfg.DATASETS.TRAIN}
    for name, records in loaded.items():
        serve_once(name, records)
    num_records = len(trainer_cls.train_records(cfg))
    for name, records in loaded.items():
        serve_once(name, records)
    schedule = epoch_schedule(cfg, num_records, world_size)
    logger.info(
        "SOLVER.MAX_EPOCHS %s over %d training records: MAX_ITER %d, STEPS %s, WARMUP_ITERS %d",
        cfg.SOLVER.MAX_EPOCHS, num_records, schedule["MAX_ITER"], schedule["STEPS"],
        schedule["WARMUP_ITERS"],
    )  # fmt: skip
    for key, value in schedule.items():
        setattr(cfg.SOLVER, key, value)
    cfg.SOLVER.MAX_EPOCHS = 0  # the config now names the schedule it runs (and is written so)
