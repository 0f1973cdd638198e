"""FIBER's training step: gradient accumulation over passes, and no step for a skipped batch.

**Accumulation.** FIBER's coarse recipes fix the images each GPU takes per pass
(``per_gpu_batchsize``, 8 for pre-training, VQA, NLVR2, ITM and captioning) and reach the global
batch (4,096 for pre-training) by accumulating gradients over ``batch / (per_gpu x GPUs)`` passes.
The pass size is part of the recipe, not only of its memory: ITC's in-batch negatives, ITM's hard
negatives and the queue's turnover are per pass (coarse spec §3.3-3.4, §8 item 10).
``SOLVER.IMS_PER_DEVICE`` names that pass size. An iteration (``SOLVER.MAX_ITER`` and every
schedule count them) is still one optimiser step over ``SOLVER.IMS_PER_BATCH`` images: each
process runs :func:`accumulation_steps` passes of ``IMS_PER_DEVICE`` images, each loss divided by
the number of passes (the mean over the passes, as the original's trainer), and DDP reduces the
gradients once, in the last pass.

**Skipped batches.** The fine-grained original skips a batch with too many images without boxes
(``SOLVER.MAX_NEG_PER_BATCH``) before its forward: no optimiser step, no LR-scheduler step, no EMA
update, while the iteration count moves on. A model that sets ``batch_skipped`` in its training
forward (``FIBER``; its losses are then zero, so the graph stays whole for DDP) gets the same here:
:class:`StepTrainer` takes no optimiser step for the iteration and sets ``step_skipped``, which the
LR-scheduler, EMA and weight-decay hooks read (:func:`step_was_skipped`). Under DDP a batch skipped
by any process is skipped by all, so every process takes the same steps (the original's per-GPU
``continue`` leaves that undefined; our choice). The ``skipped_steps`` metric counts them.

**Non-finite losses under AMP.** The original's AMP trainer goes on past an iteration whose loss is
NaN or infinite (the gradient scaler skips that update and lowers its scale), where detectron2
stops the run. :class:`AMPStepTrainer` does the same as the original: the iteration is logged as a
warning and counted (``nonfinite_steps``), the scaler skips the update, and the run goes on; only
``max_nonfinite_in_a_row`` such iterations in a row (a diverged run) stop it. Without AMP a
non-finite loss stops the run, as in detectron2.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch
import torch.distributed as dist
from detectron2.config import CfgNode
from detectron2.engine import AMPTrainer, SimpleTrainer
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from torch.nn.parallel import DistributedDataParallel

from ..config import ConfigError

__all__ = [
    "accumulation_steps",
    "with_fiber_step",
    "step_was_skipped",
    "unwrap_model",
    "StepTrainer",
    "AMPStepTrainer",
]


logger = logging.getLogger(__name__)


def accumulation_steps(cfg: CfgNode, world_size: int) -> int:
    """Passes per optimiser step: ``IMS_PER_BATCH / (world_size x IMS_PER_DEVICE)``, or 1.

    One pass when ``SOLVER.IMS_PER_DEVICE`` is 0 or when each process's share of
    ``SOLVER.IMS_PER_BATCH`` fits in one pass (more processes than the recipe's GPUs).

    Raises:
        ConfigError: the share is not a multiple of ``IMS_PER_DEVICE``.
    """

    per_process = cfg.SOLVER.IMS_PER_BATCH // max(world_size, 1)
    per_device = cfg.SOLVER.IMS_PER_DEVICE
    if per_device < 0:
        raise ConfigError(f"SOLVER.IMS_PER_DEVICE must be 0 (off) or positive, got {per_device}")
    if per_device == 0 or per_process <= per_device:
        return 1
    if per_process % per_device:
        raise ConfigError(
            f"SOLVER.IMS_PER_BATCH {cfg.SOLVER.IMS_PER_BATCH} over {world_size} process(es) gives "
            f"{per_process} per process, not a multiple of SOLVER.IMS_PER_DEVICE {per_device}"
        )
    return per_process // per_device


def step_was_skipped(trainer) -> bool:
    """True when the iteration that just ran took no optimiser step (a skipped batch);
    ``trainer`` is a ``DefaultTrainer`` (its ``_trainer``) or the step trainer itself."""
    return bool(getattr(getattr(trainer, "_trainer", trainer), "step_skipped", False))


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a (Distributed)DataParallel wrapper, or ``model`` itself."""
    wrappers = (DistributedDataParallel, torch.nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


class _StepMixin:
    """``run_step`` over ``accumulation_steps`` passes, with no optimiser step for a skipped batch;
    the subclasses say how a pass runs its forward (autocast or not), its backward (scaled or not)
    and the optimiser step."""

    accumulation_steps: int = 1
    step_skipped: bool = False
    skipped_steps: int = 0
    nonfinite_steps: int = 0
    max_nonfinite_in_a_row: int = 100
    _nonfinite_in_a_row: int = 0

    def _tolerates_nonfinite(self) -> bool:
        return False

    def state_dict(self) -> dict:
        """detectron2's (the optimiser, the gradient scaler) and the counts of the steps taken
        without an update, which the ``skipped_steps`` / ``nonfinite_steps`` metrics continue."""
        ret = super().state_dict()
        ret["steps_without_update"] = {
            "skipped": self.skipped_steps,
            "nonfinite": self.nonfinite_steps,
        }
        return ret

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        counts = state_dict.get("steps_without_update", {})  # none in detectron2's checkpoints
        self.skipped_steps = counts.get("skipped", 0)
        self.nonfinite_steps = counts.get("nonfinite", 0)

    def _forward_context(self):
        return contextlib.nullcontext()

    def _backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def _optimizer_step(self) -> None:
        self.optimizer.step()

    def _any_process(self, flag: bool, always: bool = False) -> bool:
        # a model that never skips (no ``batch_skipped``, the same on every process) needs no
        # collective per iteration, unless ``always``
        never = not hasattr(unwrap_model(self.model), "batch_skipped")
        if comm.get_world_size() == 1 or (never and not always):
            return flag
        t = torch.tensor([int(flag)], device=next(self.model.parameters()).device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def _skip_nonfinite(self, losses: dict[str, torch.Tensor]) -> bool:
        """Under AMP, an iteration whose loss is not finite on some process: counted, warned, its
        update left to the gradient scaler (which skips it); True when that happened."""
        if not self._tolerates_nonfinite():
            return False
        bad = not bool(torch.isfinite(torch.stack(list(losses.values()))).all())  # one sync
        if not self._any_process(bad, always=True):
            self._nonfinite_in_a_row = 0
            return False
        self.nonfinite_steps += 1
        self._nonfinite_in_a_row += 1
        values = {k: round(float(v), 4) for k, v in losses.items()}
        if self._nonfinite_in_a_row >= self.max_nonfinite_in_a_row:
            raise FloatingPointError(
                f"loss not finite for {self._nonfinite_in_a_row} iterations in a row under AMP "
                f"(iteration {self.iter}): {values}"
            )
        logger.warning(
            "Iteration %d: loss not finite under AMP (%s); the gradient scaler skips this update",
            self.iter,
            values,
        )
        get_event_storage().put_scalar(
            "nonfinite_steps", self.nonfinite_steps, smoothing_hint=False
        )
        self._optimizer_step()  # finds the non-finite gradients: no update, a lower scale
        return True

    def run_step(self):
        assert self.model.training, "the model was switched to eval mode during training"
        passes = self.accumulation_steps
        ddp = isinstance(self.model, DistributedDataParallel)
        self.optimizer.zero_grad()
        data_time = 0.0
        mean_losses: dict[str, torch.Tensor] = {}
        skipped = False
        for i in range(passes):
            start = time.perf_counter()
            data = next(self._data_loader_iter)
            data_time += time.perf_counter() - start
            # DDP reduces the gradients in the last pass only (all of them, accumulated)
            sync = contextlib.nullcontext() if not ddp or i == passes - 1 else self.model.no_sync()
            with sync:
                with self._forward_context():
                    loss_dict = self.model(data)
                    if isinstance(loss_dict, torch.Tensor):
                        loss_dict = {"total_loss": loss_dict}
                    loss = sum(loss_dict.values()) / passes
                self._backward(loss)
            skipped = skipped or bool(getattr(unwrap_model(self.model), "batch_skipped", False))
            for name, value in loss_dict.items():
                value = value.detach() / passes
                mean_losses[name] = mean_losses[name] + value if name in mean_losses else value
        self.after_backward()
        self.step_skipped = self._any_process(skipped)
        if self.step_skipped:
            self.skipped_steps += 1
            get_event_storage().put_scalar(
                "skipped_steps", self.skipped_steps, smoothing_hint=False
            )
            return  # no metrics of zeroed losses, no optimiser step
        if self._skip_nonfinite(mean_losses):
            return
        self._write_metrics(mean_losses, data_time)
        self._optimizer_step()


class StepTrainer(_StepMixin, SimpleTrainer):
    """detectron2's ``SimpleTrainer`` with FIBER's step (see the module docstring)."""

    def __init__(self, model, data_loader, optimizer, accumulation_steps: int = 1):
        super().__init__(model, data_loader, optimizer)
        self.accumulation_steps = accumulation_steps


class AMPStepTrainer(_StepMixin, AMPTrainer):
    """detectron2's ``AMPTrainer`` with FIBER's step; the gradient scaler scales every pass and
    unscales, checks, steps and updates once per optimiser step (not at all for a skipped one)."""

    def __init__(self, model, data_loader, optimizer, accumulation_steps: int = 1, **kwargs):
        super().__init__(model, data_loader, optimizer, **kwargs)
        self.accumulation_steps = accumulation_steps

    def _forward_context(self):
        return torch.autocast("cuda", dtype=self.precision)

    def _tolerates_nonfinite(self) -> bool:
        return self.grad_scaler.is_enabled()

    def _backward(self, loss: torch.Tensor) -> None:
        self.grad_scaler.scale(loss).backward()

    def _optimizer_step(self) -> None:
        # Unscale first: a fused optimizer (SOLVER.FUSED) would otherwise receive the scaled
        # gradients and unscale them inside its kernel, after SOLVER.CLIP_GRADIENTS had clipped them
        # at the scaled norm (65,536 x the true one at the initial scale). For the for-loop
        # optimizers this is the unscale GradScaler.step does itself.
        self.grad_scaler.unscale_(self.optimizer)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()


def with_fiber_step(trainer: SimpleTrainer, passes: int = 1) -> SimpleTrainer:
    """``trainer`` (detectron2's ``SimpleTrainer`` or ``AMPTrainer``, not yet run) as its
    counterpart with FIBER's step over the same model, data loader, optimiser (and gradient
    scaler); with ``passes`` = 1 and no skipped batch it computes exactly what detectron2's does."""
    if isinstance(trainer, AMPTrainer):
        return AMPStepTrainer(
            trainer.model, trainer.data_loader, trainer.optimizer, passes,
            grad_scaler=trainer.grad_scaler, precision=trainer.precision,
        )  # fmt: skip
    return StepTrainer(trainer.model, trainer.data_loader, trainer.optimizer, passes)
