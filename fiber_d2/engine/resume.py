"""What lets a training run be killed at any moment and continue with ``--resume``, beyond
detectron2's checkpoints: its writers and the hooks around its checkpoints and evaluations.

* :class:`ResumedJSONWriter` / :class:`ResumedTensorboardWriter`: ``metrics.json`` and TensorBoard
  hold each iteration once after a resume (the interrupted run's later iterations are dropped).
* :class:`PeriodicCheckpointerWithFinal`: ``model_final`` is written even when a kill left the run
  with no step to do.
* :class:`EvalHookCatchingUp`: a periodic evaluation that a kill interrupted runs on resume, with
  the training scalars of its iteration, which its checkpoint carries; evaluations leave the
  random number generators as they found them.
* :mod:`fiber_d2.engine.random_stream`: the resumed run reads the batches and draws the random
  numbers that the interrupted run would have read and drawn next.

:class:`~fiber_d2.engine.trainer.FIBERTrainer` puts them in place of detectron2's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable
from functools import cached_property

from detectron2.engine import hooks
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter, JSONWriter, TensorboardXWriter
from detectron2.utils.file_io import PathManager

from ..checkpoint.checkpointer import final_is_current
from ..checkpoint.safe_io import write_whole
from .random_stream import preserved_rng

__all__ = [
    "EvalHookCatchingUp",
    "PeriodicCheckpointerWithFinal",
    "ResumedJSONWriter",
    "ResumedTensorboardWriter",
]

logger = logging.getLogger(__name__)


class ResumedJSONWriter(JSONWriter):
    """detectron2's ``metrics.json`` writer, which appends to the file of an earlier run. On a run
    resumed at iteration N (``--resume``; ``resumed_at()`` is N, 0 when the interrupted run had
    written no checkpoint, None without ``--resume``), the file is rewritten once, whole, at the
    first write: the lines of iterations >= N come from the interrupted run after its last
    checkpoint and are written again by this one, so they are dropped, with any line a kill cut
    short; a line this run writes for an earlier iteration (the evaluation a kill interrupted, rerun
    by :class:`EvalHookCatchingUp`) is merged into that iteration's line. The file then holds each
    iteration once, as an uninterrupted run writes it. A run started without ``--resume`` appends,
    as detectron2 does.
    """

    def __init__(self, json_file: str, resumed_at: Callable[[], int | None], window_size: int = 20):
        super().__init__(json_file, window_size)
        self._path = json_file
        self._resumed_at = resumed_at
        self._tidied = False

    def write(self):
        start = self._resumed_at()
        if self._tidied or start is None:
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


class ResumedTensorboardWriter(TensorboardXWriter):
    """detectron2's TensorBoard writer. On a run resumed at iteration N (``--resume``), its event
    file starts with ``purge_step`` N, so TensorBoard hides the interrupted run's events of
    iterations >= N, which this run writes again (the counterpart of :class:`ResumedJSONWriter`;
    a rerun evaluation of iteration N - 1 is kept)."""

    def __init__(self, log_dir: str, resumed_at: Callable[[], int | None], **kwargs):
        super().__init__(log_dir, **kwargs)
        self._resumed_at = resumed_at

    @cached_property
    def _writer(self):  # detectron2 opens the file at the first write, after resume_or_load
        from torch.utils.tensorboard import SummaryWriter

        start = self._resumed_at()
        if start is None:
            return SummaryWriter(**self._writer_args)
        return SummaryWriter(**self._writer_args, purge_step=start)


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


class PeriodicCheckpointerWithFinal(hooks.PeriodicCheckpointer):
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


class EvalHookCatchingUp(hooks.EvalHook):
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
        with preserved_rng():  # training draws the same numbers whether or not it evaluates
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
        periodic = self._writer_hook()
        for writer in periodic._writers if periodic is not None else ():
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
        # the final evaluation is logged at MAX_ITER and reads the weights of MAX_ITER - 1
        # either way
        storage = self.trainer.storage
        storage.iter = min(storage.iter, self.trainer.max_iter)
        self._weights_iteration = storage.iter - 1
        super().after_train()
        self._record()
