"""The pieces of fiber_d2.engine.random_stream on their own: the generator states survive a
checkpoint loaded with ``weights_only=True``, evaluations leave them as found, and the sampler's
stream starts where it is told. (End to end: tests/engine/test_trainer.py, the resumed runs.)"""

import itertools
import random

import numpy as np
import torch
from detectron2.data.samplers import TrainingSampler

from fiber_d2.engine.random_stream import (
    ResumableSampler,
    preserved_rng,
    rng_state,
    set_rng_state,
)


def _draws():
    return (
        torch.rand(4).tolist(),
        np.random.rand(4).tolist(),
        np.random.randn(1).tolist(),  # numpy's cached Gaussian
        [random.random() for _ in range(4)],
        [random.gauss(0, 1) for _ in range(3)],  # Python's cached Gaussian
    )


def test_generator_states_survive_a_weights_only_checkpoint(tmp_path):
    random.gauss(0, 1), np.random.randn(1)  # a Gaussian half-drawn in each cache
    torch.save({"rng": rng_state()}, tmp_path / "state.pth")
    expected = _draws()
    _draws()  # move every generator on
    set_rng_state(torch.load(tmp_path / "state.pth", weights_only=True)["rng"])
    assert _draws() == expected


def test_what_runs_under_preserved_rng_leaves_the_generators_as_found():
    state = rng_state()
    expected = _draws()
    set_rng_state(state)
    with preserved_rng():
        _draws()
    assert _draws() == expected


def test_the_stream_starts_where_it_is_told_with_the_seed_it_is_given():
    whole = list(itertools.islice(TrainingSampler(10, seed=3), 40))
    sampler = ResumableSampler(TrainingSampler(10, seed=7))
    sampler.seed, sampler.start = 3, 23
    assert sampler.seed == 3
    assert list(itertools.islice(sampler, 17)) == whole[23:]
