"""``FIBERTrainer``: detectron2's DefaultTrainer with FIBER's builders, EMA and CPU-friendly DDP.

It overrides only the builders that differ (model wrapping, optimizer, data loaders, evaluator) and adds
the EMA / weight-decay-schedule hooks. Both stages (``FIBER`` fine-grained detector and ``FIBERCoarse``
pre-training) run through it; the stage is chosen by ``MODEL.META_ARCHITECTURE``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import weakref
from collections.abc import Callable, Iterator
from functools import cached_property

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
from detectron2.utils.events import CommonMetricPrinter, JSONWriter, TensorboardXWriter
from detectron2.utils.file_io import PathManager

from ..checkpoint.checkpointer import FIBERCheckpointer, final_is_current
from ..checkpoint.safe_io import write_whole
from .hooks import EMAHook, ModelEMA, WeightDecayScheduleHook
from .optimizer import build_fiber_optimizer
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


class _ResumedJSONWriter(JSONWriter):
    """detectron2's ``metrics.json`` writer, which appends to the file of an earlier run. On a run
    resumed at iteration N (``--resume``: ``resuming()``; ``start_iter()`` is N, or 0 when the
    interrupted run had written no checkpoint), the file is rewritten once, whole, at the first
    write: the lines of iterations >= N come from the interrupted run after its last checkpoint and
    are written again by this one, so they are dropped, with any line a kill cut short; a line this
    run writes for an earlier iteration (the evaluation a kill interrupted, rerun by
    :class:`_EvalHookCatchingUp`) is merged into that iteration's line. The file then holds each
    iteration once, as an uninterrupted run writes it. A run started without ``--resume`` appends,
    as detectron2 does.
    """

    def __init__(
        self,
        json_file: str,
        start_iter: Callable[[], int],
        resuming: Callable[[], bool] = lambda: False,
        window_size: int = 20,
    ):
        super().__init__(json_file, window_size)
        self._path = json_file
        self._start_iter = start_iter
        self._resuming = resuming
        self._tidied = False

    def write(self):
        start = self._start_iter()
        if self._tidied or (start <= 0 and not self._resuming()):
            super().write()
            return
        self._tidied = True
        handle, self._file_handle = self._file_handle, _Captured()
        try:
            super().write()
        finally:
            captured, self._file_handle = self._file_handle, handle
        handle.close()
        _rewrite_metrics(self._path, start, "".join(captured.parts).splitlines())
        self._file_handle = PathManager.open(self._path, "a")


class _ResumedTensorboardWriter(TensorboardXWriter):
    """detectron2's TensorBoard writer. On a run resumed at iteration N (``--resume``), its event
    file starts with ``purge_step`` N, so TensorBoard hides the interrupted run's events of
    iterations >= N, which this run writes again (the counterpart of :class:`_ResumedJSONWriter`;
    a rerun evaluation of iteration N - 1 is kept)."""

    def __init__(
        self, log_dir: str, start_iter: Callable[[], int], resuming: Callable[[], bool], **kwargs
    ):
        super().__init__(log_dir, **kwargs)
        self._start_iter = start_iter
        self._resuming = resuming

    @cached_property
    def _writer(self):  # detectron2 opens the file at the first write, after resume_or_load
        from torch.utils.tensorboard import SummaryWriter

        start = self._start_iter()
        if self._resuming() or start > 0:
            return SummaryWriter(**self._writer_args, purge_step=start)
        return SummaryWriter(**self._writer_args)


class _Captured:
    """What :meth:`JSONWriter.write` writes, kept in memory (it has no ``fileno``, so the writer
    skips its fsync)."""

    def __init__(self):
        self.parts: list[str] = []

    def write(self, text: str) -> None:
        self.parts.append(text)

    def flush(self) -> None:
        pass


def _rewrite_metrics(path: str, start: int, new_lines: list[str]) -> None:
    """Rewrite the ``metrics.json`` at ``path`` (whole or not at all) without its lines of
    iterations >= ``start`` and its lines that are not a JSON object with an ``iteration``, then
    with ``new_lines``: each merged into the kept line of its iteration, or appended."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    kept: list[str] = []
    row_of: dict[int, int] = {}  # iteration -> index in kept of its first line
    dropped, unreadable = 0, 0
    for line in lines:
        try:
            iteration = json.loads(line)["iteration"]
            later = iteration >= start
        except (ValueError, TypeError, KeyError):
            unreadable += 1
            continue
        if later:
            dropped += 1
            continue
        row_of.setdefault(iteration, len(kept))
        kept.append(line)
    merged = 0
    for line in new_lines:
        scalars = json.loads(line)
        row = row_of.get(scalars["iteration"])
        if row is None:
            kept.append(line)
            continue
        kept[row] = json.dumps({**json.loads(kept[row]), **scalars}, sort_keys=True)
        merged += 1
    with write_whole(path, "w") as f:
        f.writelines(line + "\n" for line in kept)
    if dropped or unreadable or merged:
        logger.info(
            "%s: resuming at iteration %d, dropped %d line(s) of the interrupted run's later"
            " iterations and %d unreadable line(s), merged %d line(s) of earlier iterations",
            path,
            start,
            dropped,
            unreadable,
            merged,
        )


class _PeriodicCheckpointerWithFinal(hooks.PeriodicCheckpointer):
    """detectron2's periodic checkpointer, which also writes ``model_final`` when a run ends without
    a step: a run killed after its last periodic checkpoint but before ``model_final`` was whole
    resumes at ``MAX_ITER``, where detectron2's hook (it saves in ``after_step`` only) would leave
    the stage without its final weights on every later ``--resume``."""

    def before_train(self):
        super().before_train()
        if self.trainer.start_iter > self.max_iter:
            logger.warning(
                "The checkpoint resumed is at iteration %d, past SOLVER.MAX_ITER %d: nothing to "
                "train, and no model_final is written",
                self.trainer.start_iter - 1,
                self.max_iter,
            )

    def after_train(self):
        # detectron2's loop leaves trainer.iter at MAX_ITER (or one past it when no step ran)
        # only when training finished without an exception
        finished = self.trainer.iter >= self.max_iter >= self.trainer.start_iter
        final = os.path.join(self.checkpointer.save_dir, f"{self.file_prefix}_final.pth")
        # an existing final that last_checkpoint does not name is an earlier run's (this one
        # started over in the same folder and was killed before replacing it)
        current = final_is_current(self.checkpointer.save_dir, self.file_prefix)
        if finished and comm.is_main_process() and not current:
            logger.info(
                "The run ended at iteration %d without %s: writing it", self.max_iter, final
            )
            self.checkpointer.save(f"{self.file_prefix}_final", iteration=self.max_iter - 1)
        super().after_train()


class _EvalHookCatchingUp(hooks.EvalHook):
    """detectron2's evaluation hook, which also reruns a periodic evaluation that a killed run did
    not finish.

    The periodic checkpoint of an evaluation iteration is written just before that evaluation, so
    a run killed during it resumes after it and would never evaluate that iteration. Each finished
    evaluation writes the iteration of the weights it evaluated to ``OUTPUT_DIR/last_evaluation``
    (main process, whole or not at all; a run that starts at iteration 0 removes an earlier run's)
    once the periodic writers have written its results (at the next step); a run resumed from an
    evaluation iteration's checkpoint that the file does not name evaluates those weights first,
    logged at that iteration, and writes the results at once (``metrics.json`` merges them into
    that iteration's line).

    The periodic writers write an iteration's training scalars after its evaluation, so a process
    killed during the evaluation loses them too. The checkpoint of an evaluation iteration therefore
    carries them, as the writers would have written them (:meth:`state_dict`), and the rerun
    evaluation writes them with its results.
    """

    FILE = "last_evaluation"

    def __init__(self, eval_period: int, eval_function: Callable, output_dir: str, **kwargs):
        super().__init__(eval_period, eval_function, **kwargs)
        self.path = os.path.join(output_dir, self.FILE)
        self._weights_iteration = -1  # the iteration whose weights the next evaluation reads
        self._unwritten: dict = {}  # from the checkpoint resumed (load_state_dict)
        self._unrecorded: int | None = None  # an evaluation not yet in the file

    def _evaluated_iteration(self) -> int | None:
        try:
            with open(self.path) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def _do_eval(self):
        super()._do_eval()
        # recorded once the periodic writers, which follow this hook, have written its results
        self._unrecorded = self._weights_iteration

    def _record(self) -> None:
        if self._unrecorded is not None and comm.is_main_process():
            with write_whole(self.path, "w") as f:
                f.write(f"{self._unrecorded}\n")
        self._unrecorded = None

    def before_step(self):
        self._record()

    def before_train(self):
        if self.trainer.start_iter == 0 and comm.is_main_process():
            # a run that starts over: the file is an earlier run's, and would pass this run's
            # checkpoint of that iteration as evaluated
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
        resumed_after = self.trainer.start_iter - 1  # the iteration of the checkpoint resumed
        due = self._period > 0 and resumed_after >= 0 and (resumed_after + 1) % self._period == 0
        if not due or resumed_after + 1 >= self.trainer.max_iter:  # the final evaluation follows
            return
        if self._evaluated_iteration() == resumed_after:
            return
        logger.info(
            "The evaluation of iteration %d did not finish before the run stopped: running it",
            resumed_after,
        )
        storage = self.trainer.storage
        storage.iter = self._weights_iteration = resumed_after
        try:
            if self._unwritten.get("iteration") == resumed_after:
                for name, (value, smoothed) in self._unwritten["scalars"].items():
                    # one value in the history: a smoothed scalar is written as saved
                    storage.put_scalar(name, value, smoothing_hint=smoothed)
            self._do_eval()
            self._write_results()
            self._record()
        finally:
            storage.iter = self.trainer.start_iter

    def _write_results(self):
        """Write the catch-up evaluation's scalars now, at their iteration: the periodic writers
        would first write after the next evaluation has replaced them in the storage."""
        for h in self.trainer._hooks:
            if isinstance(h, hooks.PeriodicWriter):
                for writer in h._writers:
                    if not isinstance(writer, CommonMetricPrinter):  # it reports training progress
                        writer.write()

    def _writer_hook(self) -> hooks.PeriodicWriter | None:
        return next((h for h in self.trainer._hooks if isinstance(h, hooks.PeriodicWriter)), None)

    def state_dict(self) -> dict:
        """Saved with each checkpoint. At an iteration whose periodic evaluation follows its
        checkpoint and whose scalars the periodic writers write, ``{"iteration": N, "scalars":
        {name: (value, smoothing_hint)}}``: the values as ``metrics.json`` would hold them (smoothed
        over its writer's window); else empty."""
        it, writer = self.trainer.iter, self._writer_hook()
        storage = getattr(self.trainer, "storage", None)  # none before train()
        due = self._period > 0 and (it + 1) % self._period == 0 and it + 1 < self.trainer.max_iter
        if not due or writer is None or storage is None or (it + 1) % writer._period != 0:
            return {}
        window = next((w._window_size for w in writer._writers if isinstance(w, JSONWriter)), 20)
        hints = storage.smoothing_hints()
        latest = storage.latest_with_smoothing_hint(window)
        scalars = {k: (float(v), bool(hints[k])) for k, (v, i) in latest.items() if i == it}
        return {"iteration": it, "scalars": scalars}

    def load_state_dict(self, state_dict: dict) -> None:
        self._unwritten = state_dict

    def after_step(self):
        self._weights_iteration = self.trainer.iter
        super().after_step()

    def after_train(self):
        # detectron2's loop ends at MAX_ITER, or one past it when a resumed run had no step left:
        # the final evaluation is logged at MAX_ITER and reads the weights of MAX_ITER - 1 either way
        storage = self.trainer.storage
        storage.iter = min(storage.iter, self.trainer.max_iter)
        self._weights_iteration = storage.iter - 1
        super().after_train()
        self._record()


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
                ret[i] = _PeriodicCheckpointerWithFinal(
                    h.checkpointer,
                    h.period,
                    max_iter=h.max_iter,
                    max_to_keep=h.max_to_keep,
                    file_prefix=h.file_prefix,
                )
            elif type(h) is hooks.EvalHook:
                ret[i] = _EvalHookCatchingUp(
                    h._period, h._func, cfg.OUTPUT_DIR, eval_after_train=h._eval_after_train
                )
        model = self._trainer.model
        extra = []
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
        """detectron2's writers, with ``metrics.json`` written by :class:`_ResumedJSONWriter` (a
        resumed run's file holds each iteration once) and TensorBoard's events by
        :class:`_ResumedTensorboardWriter` (TensorBoard shows each iteration once)."""
        trainer = weakref.proxy(self)
        writers = super().build_writers()
        for i, w in enumerate(writers):
            if type(w) is JSONWriter:
                w.close()
                path = os.path.join(self.cfg.OUTPUT_DIR, "metrics.json")
                writers[i] = _ResumedJSONWriter(
                    path, lambda: trainer.start_iter, lambda: trainer.resuming
                )
            elif type(w) is TensorboardXWriter:
                writers[i] = _ResumedTensorboardWriter(
                    w._writer_args["log_dir"], lambda: trainer.start_iter, lambda: trainer.resuming
                )
        return writers

    def resume_or_load(self, resume: bool = True):
        """detectron2's; ``resuming`` records ``resume`` (a run resumed before its first checkpoint
        starts at iteration 0, yet its ``metrics.json`` holds the interrupted run's lines)."""
        self.resuming = resume
        super().resume_or_load(resume=resume)

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
        (``SOLVER.IMS_PER_DEVICE``; :mod:`fiber_d2.engine.train_step`).
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
        return build_detection_train_loader(cfg, mapper=mapper, **kwargs)

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
