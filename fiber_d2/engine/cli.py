"""The shared body of the training entry points (``tools/train_net.py`` and the projects' ``train_net.py``).

Each entry point only names its trainer class and, when it adds config keys, its config loader:

    def main(args):
        return run(args, FIBERTrainer)

    if __name__ == "__main__":
        launch_cli(main)

Bad input ends in one ``error:`` line (no traceback): config mistakes, unsafe or unfit checkpoints
(:class:`~fiber_d2.checkpoint.CheckpointError`), unusable datasets or test records
(:class:`~fiber_d2.data.datasets.common.BadRecordError`) and evaluations that did not see every record
exactly once (:class:`~fiber_d2.evaluation.EvaluationCoverageError`). The config, the checkpoint to
load and the training data are checked before anything in ``OUTPUT_DIR`` is written, so a failed
start leaves an existing ``OUTPUT_DIR`` as it was; ``results.json`` is written only on success, as
strict JSON (NaN metrics become ``null``).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence

import torch
from detectron2.config import CfgNode
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch.multiprocessing import ProcessExitedException

from ..checkpoint.checkpointer import FIBERCheckpointer, check_weights_before_run
from ..checkpoint.safe_io import CheckpointError, one_line, write_whole
from ..data.datasets.common import BadRecordError, check_datasets_before_run
from ..evaluation.integrity import EvaluationCoverageError, json_safe
from .memory import apply_mmap_threshold
from .parent_death import end_with_parent
from .schedule import resolve_epoch_schedule
from .setup import (
    ConfigError,
    check_device_available,
    check_tokenizer_available,
    check_tower_weights_available,
    load_config,
    validate_config,
)

__all__ = [
    "USER_ERRORS",
    "check_before_run",
    "check_mappers",
    "cpu_threads_per_process",
    "setup_cfg",
    "run",
    "launch_cli",
    "hide_gpus_from_cpu_workers",
    "end_with_parent",
    "run_child",
    "run_tied",
]

ConfigLoader = Callable[[str, list], CfgNode]

# Errors that are the user's input, reported as one line.
USER_ERRORS = (ConfigError, CheckpointError, BadRecordError, EvaluationCoverageError)

logger = logging.getLogger(__name__)


def check_before_run(cfg: CfgNode, *, training: bool, resume: bool, trainer_cls=None) -> None:
    """Everything that can be checked before a run writes to ``OUTPUT_DIR``: the config's names,
    sizes and paths, a CUDA device when the config asks for one, the datasets' annotations, the
    training sets (one readable image), the test images (present, decode in full), the tokenizer, the
    towers' own pretrained weights (MODEL.SWIN.WEIGHTS, MODEL.LANGUAGE_BACKBONE.WEIGHTS), the
    checkpoint that will be loaded (safe format, fits the model), ``trainer_cls``'s dataset mappers
    (:func:`check_mappers`) and, last, ``OUTPUT_DIR`` (created when missing, writable).

    Raises:
        ConfigError, BadRecordError, CheckpointError: one line naming the culprit.
    """
    validate_config(cfg, training=training)
    check_device_available(cfg.MODEL.DEVICE, f"MODEL.DEVICE {cfg.MODEL.DEVICE}")
    check_datasets_before_run(
        cfg.DATASETS.TRAIN if training else (),
        cfg.DATASETS.TEST,
        check_test_files=not cfg.TEST.UNREADABLE_IMAGE_AS_EMPTY,
        exif_orientation=cfg.INPUT.EXIF_ORIENTATION,
        filter_empty_annotations=training and cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
    )
    check_tokenizer_available(cfg)
    check_tower_weights_available(cfg)
    check_weights_before_run(cfg, resume=resume, inference=not training)
    if trainer_cls is not None:
        check_mappers(cfg, trainer_cls, training=training)
    check_output_dir(cfg.OUTPUT_DIR)


def check_mappers(cfg: CfgNode, trainer_cls, *, training: bool) -> None:
    """Build the trainer's dataset mappers (``trainer_cls.build_mapper``) once before the run writes
    anything, so a setting the data path refuses (e.g. ``INPUT.VL_CACHE_IMAGES`` with a random
    transform, ``DATASETS.CAPTION_PROMPT`` with ``DATASETS.TEST_PROMPT``) stops it there, checked by
    the mapper's own code. Cheap: a mapper reads no image when built.

    Raises:
        ConfigError: the mapper's one line.
    """
    if training:
        trainer_cls.build_mapper(cfg, True)
    if cfg.DATASETS.TEST:
        trainer_cls.build_mapper(cfg, False)


def check_output_dir(path: str, name: str = "OUTPUT_DIR") -> None:
    """Create ``OUTPUT_DIR`` when missing and make sure a file can be written in it (the last
    pre-run check, so a run refused earlier leaves no empty folder).

    Args:
        path: the folder.
        name: how the error line names it (a config key or a command-line flag).

    Raises:
        ConfigError: one line naming the folder and why.
    """
    existing = os.path.abspath(path)
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"{name} {path} cannot be written: {existing} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ConfigError(f"{name} {path} cannot be written: {e.strerror or e}") from None


def check_output_file(path: str, name: str) -> None:
    """:func:`check_output_dir` for the folder of an output file (``--output x.pth``, ``--json``).

    Raises:
        ConfigError: one line naming the file, its folder and why.
    """
    folder = os.path.dirname(os.path.abspath(path))
    try:
        check_output_dir(folder, "its folder")
    except ConfigError as e:
        raise ConfigError(f"{name} {path}: {e}") from None
    if os.path.isdir(path):
        raise ConfigError(f"{name} {path} is a folder; give a file name")


def cpu_threads_per_process(
    cfg: CfgNode, local_processes: int, environ: Mapping[str, str] = os.environ
) -> int | None:
    """The intra-op thread count for one of ``local_processes`` CPU training processes on this
    machine, or None to keep torch's default.

    torch gives every process one thread per core, so N gloo processes on a CPU run N x cores
    threads on the cores (2 processes of the Demo detector on a 2-core machine: 3.49 s per training
    iteration, against 0.48-0.50 s with one thread each). The cores are shared out instead:
    cores // N each, at least 1. An explicit ``OMP_NUM_THREADS`` is the user's choice and is kept;
    one process, or a GPU run, keeps torch's default.
    """
    if local_processes <= 1 or cfg.MODEL.DEVICE != "cpu" or environ.get("OMP_NUM_THREADS"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // local_processes)


def setup_cfg(args, *, load: ConfigLoader = load_config, loggers: Sequence[str] = ("fiber_d2",)):
    """Load, validate and freeze the config of ``args``; detectron2's ``default_setup`` plus the
    named loggers writing to ``OUTPUT_DIR``."""
    cfg = load(args.config_file, args.opts)
    validate_config(cfg, training=not args.eval_only)
    cfg.freeze()
    default_setup(cfg, args)
    for name in loggers:
        setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name=name)
    return cfg


def warn_if_starting_over(output_dir: str) -> bool:
    """Warn (and return True) when a training run without ``--resume`` is about to overwrite the
    checkpoints of an earlier run in ``output_dir``, as detectron2 does without a word."""
    earlier = os.path.join(output_dir, "last_checkpoint")
    if not os.path.isfile(earlier):
        return False
    with open(earlier) as f:
        last = f.read().strip() or "empty"
    logger.warning(
        "OUTPUT_DIR %s holds an earlier run (last_checkpoint: %s); this run starts over and "
        "overwrites its checkpoints as it goes; --resume continues that run instead",
        output_dir,
        last,
    )
    return True


def run(
    args,
    trainer_cls,
    *,
    load: ConfigLoader = load_config,
    loggers: Sequence[str] = ("fiber_d2",),
) -> dict | None:
    """Evaluate (``--eval-only``) or train (``--resume`` continues from ``OUTPUT_DIR``).

    Returns the final evaluation results, which the main process also writes to
    ``OUTPUT_DIR/results.json``.
    """
    try:
        cfg = load(args.config_file, args.opts)
        check_before_run(
            cfg, training=not args.eval_only, resume=args.resume, trainer_cls=trainer_cls
        )
        if not args.eval_only:  # SOLVER.MAX_EPOCHS -> MAX_ITER, before config.yaml is written
            resolve_epoch_schedule(cfg, trainer_cls, comm.get_world_size())
    except USER_ERRORS as e:
        raise SystemExit(f"error: {one_line(e)}") from None
    cfg.freeze()
    default_setup(cfg, args)
    for name in loggers:
        setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name=name)
    threads = cpu_threads_per_process(cfg, comm.get_local_size())
    if threads is not None:
        torch.set_num_threads(threads)
        logger.info(
            "CPU processes on this machine: %d, intra-op threads each: %d",
            comm.get_local_size(),
            threads,
        )
    if not args.eval_only and not args.resume:
        warn_if_starting_over(cfg.OUTPUT_DIR)
    if not args.eval_only:  # a memory saving that costs time; inference gains little from it
        mib = apply_mmap_threshold(cfg.CPU_MMAP_THRESHOLD_MB)
        logger.info("glibc mmap threshold: %s", f"{mib} MiB" if mib else "glibc's default")
    try:
        if args.eval_only:
            model = trainer_cls.build_model(cfg)
            FIBERCheckpointer(
                model,
                save_dir=cfg.OUTPUT_DIR,
                partial_ok=cfg.MODEL.WEIGHTS_PARTIAL_OK,
                inference=True,
            ).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
            results = trainer_cls.test(cfg, model)
            verify_results(cfg, results)
        else:
            trainer = trainer_cls(cfg)
            trainer.resume_or_load(resume=args.resume)
            trainer.train()
            results = getattr(trainer, "_last_eval_results", None)  # set by the final evaluation
    except USER_ERRORS as e:
        logger.error("%s", one_line(e))
        raise SystemExit(f"error: {one_line(e)}") from None
    if comm.is_main_process() and results:
        # whole or not at all: the pipelines take model_final.pth + results.json as "stage done"
        with write_whole(os.path.join(cfg.OUTPUT_DIR, "results.json"), "w") as f:
            json.dump(json_safe(results), f, indent=2, allow_nan=False)
    end_processes_together(getattr(args, "finished_ranks", None))
    return results


def end_processes_together(finished=None) -> None:
    """In a multi-process run, let every process leave only when all are done, then close the
    process group. Without it the other ranks returned while the main process still scored and
    wrote ``results.json``, and gloo could abort a rank that exited with its threads alive
    ("terminate called without an active exception"); ``launch`` then killed the main process
    before it had written anything.

    Args:
        finished: optional shared array of this machine's processes (:func:`launch_cli`); this
            process's slot (its local rank) is set to 1 once all processes have met.
    """
    rank = comm.get_rank()
    if comm.get_world_size() > 1:
        comm.synchronize()
        torch.distributed.destroy_process_group()
    if finished is not None:
        finished[rank % len(finished)] = 1  # global rank = machine rank x processes + local rank


def hide_gpus_from_cpu_workers(cfg: CfgNode, world_size: int) -> None:
    """Let a multi-process CPU run (``--num-gpus N MODEL.DEVICE cpu``) start on a machine that has
    GPUs: detectron2's ``launch`` picks NCCL and asserts N <= the GPU count whenever CUDA is
    visible, whatever ``MODEL.DEVICE`` says, and NCCL cannot carry the CPU tensors of DDP and the
    gathers. The spawned workers inherit ``CUDA_VISIBLE_DEVICES=""`` and use gloo instead."""
    if world_size > 1 and cfg.MODEL.DEVICE == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


# Set by :func:`run_child` for the process it starts: the pid that process should end with.
END_WITH_PARENT_ENV = "FIBER_D2_END_WITH_PARENT"


def _end_with_the_process_that_ran_this_one() -> None:
    """In a process that :func:`run_child` started: end with that parent. Not when something
    stands between them (the parent pid is alive, but not this process's parent)."""
    parent = os.environ.pop(END_WITH_PARENT_ENV, "")
    if not parent.isdigit():
        return
    pid = int(parent)
    if os.getppid() != pid:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            os._exit(1)  # the parent already died
        except PermissionError:
            pass
        return
    end_with_parent(pid)


def run_child(cmd: Sequence[str]) -> None:
    """``subprocess.run(cmd, check=True)`` for a ``train_net.py`` stage of a pipeline, which ends
    with this process: a pipeline killed with SIGKILL left its stage training on, beside the stage
    that the pipeline's rerun started (the stage reads :data:`END_WITH_PARENT_ENV` in
    :func:`launch_cli`)."""
    import subprocess

    subprocess.run(list(cmd), check=True, env={**os.environ, END_WITH_PARENT_ENV: str(os.getpid())})


def run_tied(cmd: Sequence[str], **kwargs):
    """``subprocess.run(cmd, **kwargs)`` for a child that measures (``tools/benchmark.py``'s
    reference and variant runs, ``tools/gpu_report.py``'s benchmarks), which ends (SIGKILL) when
    this process dies on Linux, as :func:`end_with_parent` does for a run's workers: a tool killed
    while it waited left its child running on the device, beside the measurements of its rerun.
    Elsewhere the child runs on, as with ``subprocess.run``. ``cmd[0]`` is a program's path or a
    name on ``PATH``. Unlike :func:`run_child`, the child need not cooperate (a pytest run)."""
    import shutil
    import subprocess

    from . import parent_death

    program = shutil.which(cmd[0]) or cmd[0]
    # the module run as a script: it imports no fiber_d2 (detectron2, torch), milliseconds
    tied = [sys.executable, parent_death.__file__, str(os.getpid()), program, *cmd[1:]]
    return subprocess.run(tied, **kwargs)


def _worker(main: Callable, launcher_pid: int, *args):
    end_with_parent(launcher_pid)
    return main(*args)


def launch_cli(main: Callable, *, load: ConfigLoader = load_config) -> None:
    """Parse detectron2's standard arguments, reject a bad config with one ``error:`` line before
    any worker starts, then ``launch`` ``main(args)`` on ``--num-gpus`` processes."""
    _end_with_the_process_that_ran_this_one()
    args = default_argument_parser().parse_args()
    try:
        cfg = load(args.config_file, args.opts)
        validate_config(cfg, training=not args.eval_only)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    hide_gpus_from_cpu_workers(cfg, args.num_gpus * args.num_machines)
    entry = main
    if args.num_gpus * args.num_machines > 1:
        # each worker of this machine marks itself once run() is done (results written, processes
        # met at the end): a worker that then dies at exit has lost nothing. One byte per worker,
        # written by that worker only: no lock (whose semaphore a killed launcher would leak)
        spawn = torch.multiprocessing.get_context("spawn")
        args.finished_ranks = spawn.Array("b", args.num_gpus, lock=False)
        entry = functools.partial(_worker, main, os.getpid())  # spawned: each ends with this one
    try:
        launch(
            entry,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
        )
    except ProcessExitedException as e:
        finished = getattr(args, "finished_ranks", None)
        if finished is not None and all(finished):
            # gloo can abort a process while it tears its threads down ("terminate called without
            # an active exception"), after all the work is done
            logger.warning(
                "worker process %d ended with code %s at exit, after every process had finished "
                "its run; the results are complete",
                e.error_index,
                e.exit_code,
            )
            return
        # a worker ended with its own "error:" line above
        sys.exit(f"error: worker process {e.error_index} exited with code {e.exit_code}")
