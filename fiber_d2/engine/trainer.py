"""``FIBERTrainer``: detectron2's DefaultTrainer with FIBER's builders, EMA and CPU-friendly DDP.

It overrides only the builders that differ (model wrapping, optimizer, data loaders, evaluator) and
adds the EMA / weight-decay-schedule hooks and those that let a killed run resume as if
uninterrupted (:mod:`fiber_d2.engine.resume`, :mod:`fiber_d2.engine.random_stream`). Both stages
(``FIBER`` fine-grained detector and ``FIBERCoarse`` pre-training) run through it; the stage is
chosen by ``MODEL.META_ARCHITECTURE``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import weakref
from collections.abc import Callable, Iterator

import detectron2.engine.defaults as d2_defaults
import torch
from detectron2.config import CfgNode
from detectron2.data import (
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.engine import DefaultTrainer, hooks
from detectron2.utils import comm
from detectron2.utils.events import JSONWriter, TensorboardXWriter

from ..checkpoint.checkpointer import FIBERCheckpointer
from .hooks import EMAHook, ModelEMA, WeightDecayScheduleHook
from .optimizer import build_fiber_optimizer
from .random_stream import ResumableSampler, ResumedStream
from .resume import (
    EvalHookCatchingUp,
    PeriodicCheckpointerWithFinal,
    ResumedJSONWriter,
    ResumedTensorboardWriter,
)
from .train_step import accumulation_steps, step_was_skipped, with_fiber_step

__all__ = ["FIBERTrainer", "fiber_ddp", "is_coarse_stage"]

logger = logging.getLogger(__name__)

COARSE_META_ARCHS = ("FIBERCoarse",)


def is_coarse_stage(cfg: CfgNode) -> bool:
    """True when the config trains/evaluates the coarse-grained (image-text) model."""
    return cfg.MODEL.META_ARCHITECTURE in COARSE_META_ARCHS


@contextlib.contextmanager
def fiber_ddp() -> Iterator[None]:
    """Within the block, detectron2's ``create_ddp_model`` wraps FIBER's models as they need:

    * ``device_ids=None`` for a model on the CPU: detectron2 always passes
      ``device_ids=[local_rank]``, which DistributedDataParallel rejects there (gloo runs);
    * the options a model class names in ``ddp_kwargs`` (the coarse family's, ``FIBERCoarse``)
      over detectron2's ``broadcast_buffers=False``.
    """
    original = d2_defaults.create_ddp_model

    def create_ddp_model(model, **kwargs):
        if comm.get_world_size() > 1:
            if next(model.parameters()).device.type == "cpu":
                kwargs.setdefault("device_ids", None)
            kwargs.update(getattr(model, "ddp_kwargs", {}))
        return original(model, **kwargs)

    d2_defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        d2_defaults.create_ddp_model = original


class _LRSchedulerUnlessSkipped(hooks.LRScheduler):
    """detectron2's LR-scheduler hook, with no scheduler step for a skipped batch (as FIBER)."""

    def after_step(self):
        if not step_was_skipped(self.trainer):
            super().after_step()


# checkpoints key each hook's state by its class's qualified name: keep detectron2's, so that
# --resume of a run saved by detectron2's hook (or this one) restores the scheduler
_LRSchedulerUnlessSkipped.__qualname__ = hooks.LRScheduler.__qualname__


class _StopWhenEverySkipped:
    """A training mapper that raises one :class:`BadRecordError` line once it has skipped (returned
    None for) as many records in a row as the dataset holds.

    detectron2's loader retries a skipped record with another one it has not seen fail, so that
    many skips in a row means that every record was skipped, where the loader's next draw would
    fail with ``random.sample``'s "Sample larger than population" traceback.
    """

    def __init__(self, mapper: Callable, num_records: int):
        self.mapper = mapper
        self.num_records = num_records
        self.skipped_in_a_row = 0

    def __call__(self, record: dict):
        out = self.mapper(record)
        if out is not None:
            self.skipped_in_a_row = 0
            return out
        self.skipped_in_a_row += 1
        if self.skipped_in_a_row >= self.num_records:
            from ..data.datasets.common import BadRecordError

            raise BadRecordError(
                f"every one of the {self.num_records} training records was skipped by the mapper "
                "(the reasons are in the warnings above)"
            )
        return None


class FIBERTrainer(DefaultTrainer):
    """DefaultTrainer for both FIBER stages (see module docstring).

    A project's trainer names its mapper (:meth:`build_mapper`) and evaluator; the loaders use
    the mapper, the test loader batches ``test_batch_size`` records, and evaluators write under
    :meth:`inference_folder` unless given a folder.
    """

    # records per test batch: one image for the detector (detectron2's default); the fused-task
    # projects batch their (image, text) records
    test_batch_size: int = 1
    # whether resume_or_load was asked to resume (--resume), whatever it found
    resuming: bool = False

    def __init__(self, cfg: CfgNode):
        from .setup import register_config_datasets  # setup imports this module

        register_config_datasets(cfg)  # DATASETS.REGISTER, for a config not made by load_config
        with fiber_ddp():
            super().__init__(cfg)
        # gradient accumulation (SOLVER.IMS_PER_DEVICE) and skipped batches (fiber_d2.engine.train_step)
        self._trainer = with_fiber_step(
            self._trainer, accumulation_steps(cfg, comm.get_world_size())
        )

    def build_hooks(self):
        cfg = self.cfg
        # Safe loading (weights_only) and the coarse-to-fine hand-off; same role as detectron2's.
        self.checkpointer = FIBERCheckpointer(
            self._trainer.model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        ret = [
            _LRSchedulerUnlessSkipped() if type(h) is hooks.LRScheduler else h
            for h in super().build_hooks()
        ]
        for i, h in enumerate(ret):
            if type(h) is hooks.PeriodicCheckpointer:
                ret[i] = PeriodicCheckpointerWithFinal(
                    h.checkpointer,
                    h.period,
                    max_iter=h.max_iter,
                    max_to_keep=h.max_to_keep,
                    file_prefix=h.file_prefix,
                )
            elif type(h) is hooks.EvalHook:
                ret[i] = EvalHookCatchingUp(
                    h._period, h._func, cfg.OUTPUT_DIR, eval_after_train=h._eval_after_train
                )
        model = self._trainer.model
        sampler = getattr(self._trainer.data_loader, "resumable_sampler", None)
        per_step = cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()  # all passes of a step
        extra = [ResumedStream(sampler, per_step, cfg.SOLVER.CHECKPOINT_PERIOD)]
        self.ema = None
        if cfg.SOLVER.EMA.ENABLED:
            self.ema = ModelEMA(model, cfg.SOLVER.EMA.DECAY)
            self.checkpointer.add_checkpointable("model_ema", self.ema)
            extra.append(EMAHook(self.ema, model))
            if cfg.SOLVER.EMA.USE_FOR_EVAL:  # else the raw weights, as the original evaluates
                for h in ret:
                    if isinstance(h, hooks.EvalHook):
                        h._func = self._wrap_with_ema(h._func)
        if cfg.SOLVER.WEIGHT_DECAY_SCHEDULE:
            extra.append(
                WeightDecayScheduleHook(
                    self._trainer.optimizer,
                    cfg.SOLVER.STEPS,
                    cfg.SOLVER.WEIGHT_DECAY_SCHEDULE_RATIO,
                    scheduler=self.scheduler,
                )
            )
        # EMA must be updated before the checkpointer saves it in after_step.
        return extra + ret

    def build_writers(self):
        """detectron2's writers, with ``metrics.json`` written by :class:`ResumedJSONWriter` (a
        resumed run's file holds each iteration once) and TensorBoard's events by
        :class:`ResumedTensorboardWriter` (TensorBoard shows each iteration once)."""
        trainer = weakref.proxy(self)
        writers = super().build_writers()
        for i, w in enumerate(writers):
            if type(w) is JSONWriter:
                w.close()
                path = os.path.join(self.cfg.OUTPUT_DIR, "metrics.json")
                writers[i] = ResumedJSONWriter(path, lambda: trainer.resumed_at())
            elif type(w) is TensorboardXWriter:
                writers[i] = ResumedTensorboardWriter(
                    w._writer_args["log_dir"], lambda: trainer.resumed_at()
                )
        return writers

    def resume_or_load(self, resume: bool = True):
        """detectron2's; ``resuming`` records ``resume`` (a run resumed before its first checkpoint
        starts at iteration 0, yet its ``metrics.json`` holds the interrupted run's lines)."""
        self.resuming = resume
        super().resume_or_load(resume=resume)

    def resumed_at(self) -> int | None:
        """The iteration this run resumed at (``--resume``; 0 when no checkpoint was found), or
        None for a run started without ``--resume``."""
        return self.start_iter if self.resuming else None

    def _wrap_with_ema(self, func):
        def run():
            with self.ema.apply_to(self._trainer.model):
                return func()

        return run

    @classmethod
    def build_lr_scheduler(cls, cfg: CfgNode, optimizer: torch.optim.Optimizer):
        """detectron2's schedulers plus ``WarmupLinearDecayLR`` (coarse stage: warmup, then linear to 0)."""
        if cfg.SOLVER.LR_SCHEDULER_NAME != "WarmupLinearDecayLR":
            return super().build_lr_scheduler(cfg, optimizer)
        from detectron2.solver import LRMultiplier, WarmupParamScheduler
        from fvcore.common.param_scheduler import LinearParamScheduler

        s = cfg.SOLVER
        warmup = s.WARMUP_ITERS / max(s.MAX_ITER, 1)
        if warmup >= 1.0:  # the whole (short) run is warmup
            sched = LinearParamScheduler(s.WARMUP_FACTOR, 1.0)
        else:
            sched = WarmupParamScheduler(
                LinearParamScheduler(1.0, 0.0),
                s.WARMUP_FACTOR,
                warmup,
                s.WARMUP_METHOD,
                rescale_interval=True,
            )
        return LRMultiplier(optimizer, multiplier=sched, max_iter=s.MAX_ITER)

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
        return build_fiber_optimizer(cfg, model)

    @classmethod
    def build_mapper(cls, cfg: CfgNode, is_train: bool):
        """The dataset mapper of the configured stage."""
        from ..data.caption_mapper import CaptionDatasetMapper
        from ..data.mapper import GroundingDatasetMapper

        mapper_cls = CaptionDatasetMapper if is_coarse_stage(cfg) else GroundingDatasetMapper
        return mapper_cls(cfg, is_train)

    @classmethod
    def train_records(cls, cfg: CfgNode) -> list[dict]:
        """The records the training loader draws from: ``DATASETS.TRAIN`` as detectron2 loads it,
        with ``DATALOADER.FILTER_EMPTY_ANNOTATIONS`` applying the original's rule
        (:func:`~fiber_d2.data.datasets.common.filter_training_images`) instead of detectron2's. A
        project whose training drops records (e.g. VQA's unanswerable questions) overrides this;
        ``SOLVER.MAX_EPOCHS`` counts epochs of it."""
        from ..data.datasets.common import filter_training_images, no_usable_box

        records = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=False)
        if cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS:
            records = filter_training_images(records)
            if not records:
                raise no_usable_box(cfg.DATASETS.TRAIN)
        return records

    @classmethod
    def build_train_loader(cls, cfg: CfgNode, dataset=None, mapper=None):
        """detectron2's training loader over ``dataset`` (default: :meth:`train_records`) through
        ``mapper`` (default: :meth:`build_mapper`).

        ``DATALOADER.ASPECT_RATIO_GROUPING`` applies only where the mapper keeps each image's
        aspect ratio (the fine-grained stage). A mapper that resizes every image to one square
        (``mapper.square_images``: the coarse stage and its tasks) gets plain random batches, as
        the original's image-text loader: grouping by the stored aspect ratio would only bias
        which images share a batch (ITC and ITM draw their negatives there), and VQA / NLVR2
        outputs carry no ``height`` / ``width`` to group by.

        Each batch is one pass: ``SOLVER.IMS_PER_BATCH`` over the gradient-accumulation passes
        (``SOLVER.IMS_PER_DEVICE``; :mod:`fiber_d2.engine.train_step`). detectron2's sampler
        (``DATALOADER.SAMPLER_TRAIN``) is wrapped in a :class:`ResumableSampler`, which the loader
        carries as ``resumable_sampler``: a resumed run reads on where the interrupted one stopped
        (:mod:`fiber_d2.engine.random_stream`).
        """
        if mapper is None:
            mapper = cls.build_mapper(cfg, True)
        passes = accumulation_steps(cfg, comm.get_world_size())
        kwargs = {"total_batch_size": cfg.SOLVER.IMS_PER_BATCH // passes}
        kwargs["dataset"] = cls.train_records(cfg) if dataset is None else dataset
        if getattr(mapper, "square_images", False):
            kwargs["aspect_ratio_grouping"] = False
        with contextlib.suppress(TypeError):  # a dataset without a length keeps the bare mapper
            mapper = _StopWhenEverySkipped(mapper, len(kwargs["dataset"]))
        args = build_detection_train_loader.from_config(cfg, mapper, dataset=kwargs["dataset"])
        args.update(kwargs)
        sampler = None
        if args["sampler"] is not None:  # None: an iterable dataset, read as it comes
            args["sampler"] = sampler = ResumableSampler(args["sampler"])
        loader = build_detection_train_loader(**args)
        loader.resumable_sampler = sampler  # where ResumedStream finds it
        return loader

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        """detectron2's test loader over ``dataset_name`` through :meth:`build_mapper`. A detection
        record without a ``dataset_name`` field (e.g. one of detectron2's ``register_coco_instances``)
        is prompted with ``dataset_name``'s categories, whatever ``DATASETS.TEST`` lists."""
        from .setup import register_config_datasets

        register_config_datasets(cfg)
        mapper = cls.build_mapper(cfg, False)
        if hasattr(mapper, "default_dataset"):
            mapper.default_dataset = dataset_name
        return build_detection_test_loader(
            cfg, dataset_name, mapper=mapper, batch_size=cls.test_batch_size
        )

    @staticmethod
    def inference_folder(cfg: CfgNode, dataset_name: str, output_folder: str | None = None) -> str:
        """``output_folder``, or by default ``OUTPUT_DIR/inference/<dataset_name>``."""
        if output_folder is None:
            return os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return output_folder

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None):
        from ..evaluation import build_evaluator

        return build_evaluator(
            cfg, dataset_name, cls.inference_folder(cfg, dataset_name, output_folder)
        )
