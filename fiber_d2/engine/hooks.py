"""Training hooks FIBER needs beyond detectron2's: model EMA and the weight-decay schedule."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import torch
from detectron2.engine import HookBase

from .train_step import step_was_skipped, unwrap_model

__all__ = ["ModelEMA", "EMAHook", "WeightDecayScheduleHook", "weight_decay_multiplier"]

logger = logging.getLogger(__name__)


def _run_state_keys(model: torch.nn.Module) -> set[str]:
    """State-dict keys of the modules marked ``fresh_each_run`` (the coarse stage's queues): state
    of the run, not weights."""
    prefixes = [
        name + "." for name, m in model.named_modules() if getattr(m, "fresh_each_run", False)
    ]
    return {k for k in model.state_dict() if any(k.startswith(p) for p in prefixes)}


class ModelEMA:
    """Exponential moving average over the state dict (parameters and floating buffers).

    ``ema = decay * ema + (1 - decay) * current`` after every optimizer step (FIBER: decay 0.999).
    The buffers of modules marked ``fresh_each_run`` (the coarse stage's queues, up to 1.8 GB of
    ITM inputs) are run state: they are neither averaged nor copied, and the averaged weights are
    used with the model's own. Checkpointable: detectron2's checkpointer saves it as ``model_ema``
    and ``--resume`` restores it. :class:`EMAHook` restarts it from the model's weights when training
    starts unless it was restored, so that it averages from the weights the run loaded
    (``MODEL.WEIGHTS``), as the original builds its average after loading them.
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"SOLVER.EMA.DECAY must be in [0, 1), got {decay}")
        self.decay = decay
        model = unwrap_model(model)
        self._run_state = _run_state_keys(model)
        self.state = {
            k: v.detach().clone() for k, v in model.state_dict().items() if k not in self._run_state
        }
        self.restored = False  # set by load_state_dict (a resumed run)

    @torch.no_grad()
    def reset(self, model: torch.nn.Module) -> None:
        """Start the average again from the current weights of ``model``."""
        current = unwrap_model(model).state_dict()
        for k, avg in self.state.items():
            avg.copy_(current[k])

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Blend the current weights of ``model`` into the average."""
        current = unwrap_model(model).state_dict()
        for k, avg in self.state.items():
            v = current[k]
            if avg.dtype.is_floating_point:
                avg.mul_(self.decay).add_(v.detach().to(avg.dtype), alpha=1.0 - self.decay)
            else:
                avg.copy_(v)

    @contextlib.contextmanager
    def apply_to(self, model: torch.nn.Module) -> Iterator[None]:
        """Temporarily load the averaged weights into ``model`` (e.g. for evaluation)."""
        target = unwrap_model(model)
        backup = {k: v.detach().clone() for k, v in target.state_dict().items() if k in self.state}
        self._load(target, self.state)
        try:
            yield
        finally:
            self._load(target, backup)

    def _load(self, target: torch.nn.Module, state: dict) -> None:
        """Load the averaged keys; every other key must be run state."""
        result = target.load_state_dict(state, strict=False)
        unexpected = set(result.missing_keys) - self._run_state
        if unexpected or result.unexpected_keys:
            raise KeyError(
                f"EMA state does not fit the model: missing {sorted(unexpected)[:3]}, "
                f"unexpected {sorted(result.unexpected_keys)[:3]}"
            )

    def state_dict(self) -> dict:
        return {"decay": self.decay, "state": self.state}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.state) - set(state["state"])
        if missing:
            raise KeyError(
                f"model_ema checkpoint lacks {len(missing)} keys, e.g. {sorted(missing)[0]}"
            )
        for k, v in state["state"].items():
            if k in self.state:
                self.state[k].copy_(v)
        self.restored = True


class EMAHook(HookBase):
    """Update a :class:`ModelEMA` after every optimiser step (not after a skipped batch). When
    training starts, an average that was not restored from a checkpoint restarts from the model's
    weights: the hook is built before ``resume_or_load`` loads ``MODEL.WEIGHTS``."""

    def __init__(self, ema: ModelEMA, model: torch.nn.Module):
        self.ema = ema
        self.model = model

    def before_train(self):
        if not self.ema.restored:
            self.ema.reset(self.model)

    def after_step(self):
        if not step_was_skipped(self.trainer):
            self.ema.update(self.model)


def weight_decay_multiplier(iteration: int, milestones: Sequence[int], ratio: float) -> float:
    """FIBER's weight-decay schedule: x0.1 each time ``iteration`` passes ``ratio * milestone``.

    Stateless (a function of the iteration), so resuming from a checkpoint gives the same decay.
    """
    passed = sum(1 for m in milestones if iteration >= ratio * m)
    return 0.1**passed


class WeightDecayScheduleHook(HookBase):
    """Set every param group's weight decay to its initial value times :func:`weight_decay_multiplier`
    of the LR scheduler's step count (as FIBER reads ``scheduler.last_epoch``; it lags the iteration
    by the skipped batches), or of the iteration without a scheduler."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        milestones: Sequence[int],
        ratio: float,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    ):
        self.optimizer = optimizer
        self.milestones = tuple(milestones)
        self.ratio = ratio
        self.scheduler = scheduler

    def before_step(self):
        position = self.trainer.iter if self.scheduler is None else self.scheduler.last_epoch
        mult = weight_decay_multiplier(position, self.milestones, self.ratio)
        for g in self.optimizer.param_groups:
            g["weight_decay"] = g["initial_weight_decay"] * mult
