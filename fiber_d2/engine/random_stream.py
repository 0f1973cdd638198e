"""A resumed run reads the batches and draws the random numbers that the interrupted run would have
read and drawn next, so that ``--resume`` continues the run instead of starting its data over.

detectron2 restores the weights, the optimiser and the schedule, but a resumed run starts its
training sampler's index stream again from the first index (and, without a fixed ``SEED``, with
another shuffling seed), and its random number generators from the seed of the new process: it
trains on other batches, with other augmentations, masks and negatives, than the run it continues.

* :class:`ResumableSampler` wraps the training sampler: its stream can start at a position, and
  its shuffling seed is saved.
* :class:`ResumedStream`, a hook, saves that seed and every process's random number generators
  (torch, CUDA, numpy, Python's ``random``) with each checkpoint; on resume at iteration N it
  starts the stream at the N-th batch and restores the generators before the step of N.
* :func:`preserved_rng`: what runs inside (a periodic evaluation) leaves the generators as it found
  them, so training draws the same numbers whether or not (and whenever) it evaluates.

With ``DATALOADER.NUM_WORKERS 0`` (the Demo's) and without aspect-ratio grouping, a resumed run
therefore computes what the uninterrupted run computes, step for step, on one process or several
(resumed on as many). Where the loader has workers, each worker's generators (augmentations) start
again from their seeds; where the loader groups by aspect ratio, the images held in its groups
when the run stopped are not read; a run resumed on another number of processes keeps its own
generators. Those runs read the batches in order from where they stopped.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import random
from collections.abc import Iterator

import numpy as np
import torch
from detectron2.engine import HookBase
from detectron2.utils import comm
from torch.utils.data import Sampler

__all__ = ["ResumableSampler", "ResumedStream", "preserved_rng", "rng_state", "set_rng_state"]

logger = logging.getLogger(__name__)


def rng_state() -> dict:
    """The process's random number generator states, as tensors and numbers (a checkpoint loaded
    with ``weights_only=True`` reads them back)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {
            "version": int(version),
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        # each device saved that this process still sees (a run resumed with fewer visible
        # devices would otherwise fail on the first one missing)
        for i, device_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, i)


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Within the block, draw from the generators as usual; after it, they are as before it."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


class ResumableSampler(Sampler):
    """A training sampler's stream of indices from position ``start`` on (0: the whole stream).

    ``sampler`` is one of detectron2's infinite training samplers, whose stream is a function of its
    shuffling seed (``_seed``: :class:`~detectron2.data.samplers.TrainingSampler`,
    ``RepeatFactorTrainingSampler``) and of the process's rank, not of the time it is read.
    """

    def __init__(self, sampler: Sampler):
        self.sampler = sampler
        self.start = 0

    @property
    def seed(self) -> int | None:
        """The wrapped sampler's shuffling seed (None for a sampler without one)."""
        return getattr(self.sampler, "_seed", None)

    @seed.setter
    def seed(self, value: int) -> None:
        self.sampler._seed = int(value)

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.start, None)


class ResumedStream(HookBase):
    """Saves, with each checkpoint, the training sampler's seed, the number of indices read and the
    random number generators of every process; a run resumed from that checkpoint at iteration N
    starts the sampler's stream after those indices (``N x indices_per_step`` when neither the batch
    nor the number of processes changed; detectron2's samplers deal the stream out to the
    processes in turn) and restores the generators just before its first step (module docstring).

    Args:
        sampler: the training loader's :class:`ResumableSampler` (None: a loader without one, whose
            data order is not continued).
        indices_per_step: the indices one process reads in one iteration (``SOLVER.IMS_PER_BATCH``
            over the processes, all gradient-accumulation passes together).
        checkpoint_period: ``SOLVER.CHECKPOINT_PERIOD``: on several processes, the iterations
            whose generators are gathered for the checkpoint that follows (and the last one).
    """

    def __init__(
        self, sampler: ResumableSampler | None, indices_per_step: int, checkpoint_period: int = 0
    ):
        self.sampler = sampler
        self.indices_per_step = indices_per_step
        self.checkpoint_period = checkpoint_period
        self._loaded: dict = {}
        self._gathered: tuple[int, list] | None = None  # (iteration, each process's RNG states)

    def after_step(self):
        # Only the main process saves checkpoints: on several processes, each one's generators
        # go to it (a collective, on every process) after the steps whose checkpoint follows.
        it, period = self.trainer.iter, self.checkpoint_period
        final = it + 1 >= self.trainer.max_iter
        if comm.get_world_size() > 1 and ((period > 0 and (it + 1) % period == 0) or final):
            self._gathered = (it, comm.all_gather(rng_state()))

    def state_dict(self) -> dict:
        world = comm.get_world_size()
        # indices all processes have read once this iteration's step is done (the checkpoint
        # resumed at the next): the global stream's position, whatever batch or process count
        # the resumed run has
        read = (self.trainer.iter + 1) * self.indices_per_step * world
        state = {"world_size": world, "indices_read": read}
        if self.sampler is not None and self.sampler.seed is not None:
            state["sampler_seed"] = self.sampler.seed
        if world == 1:
            state["rng"] = [rng_state()]  # by rank
        elif self._gathered is not None and self._gathered[0] == self.trainer.iter:
            state["rng"] = self._gathered[1]
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self._loaded = state_dict

    def before_step(self):
        state, self._loaded = self._loaded, {}
        start = self.trainer.start_iter
        if not state or self.trainer.iter != start:
            return
        loop = self.trainer._trainer
        # detectron2 creates the loader's iterator at the first step (older releases: in __init__)
        read_already = getattr(loop, "_data_loader_iter_obj", "created") is not None
        if self.sampler is not None and read_already:
            logger.warning(
                "The training data was read before the resumed run's first step: it "
                "starts from the sampler's first index, not at iteration %d",
                start,
            )
        elif self.sampler is not None:
            if "sampler_seed" in state:
                self.sampler.seed = state["sampler_seed"]
            # each process reads its share
            self.sampler.start = state["indices_read"] // comm.get_world_size()
            logger.info(
                "Resuming the training data at iteration %d: the sampler's stream from index %d",
                start,
                self.sampler.start,
            )
        # The interrupted run created its loader's iterator (which draws a seed from torch's
        # generator) before the state saved; this run creates it before restoring that state.
        _ = loop._data_loader_iter
        if "rng" in state and state["world_size"] == comm.get_world_size():
            set_rng_state(state["rng"][comm.get_rank()])
