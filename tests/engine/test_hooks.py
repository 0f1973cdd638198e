"""EMA averaging/resume and the stateless weight-decay schedule."""

import types

import pytest
import torch
from torch import nn

from fiber_d2.engine.hooks import (
    EMAHook,
    ModelEMA,
    WeightDecayScheduleHook,
    weight_decay_multiplier,
)


def test_ema_average_and_apply():
    m = nn.Linear(1, 1, bias=False)
    m.weight.data.fill_(0.0)
    ema = ModelEMA(m, decay=0.5)
    m.weight.data.fill_(1.0)
    ema.update(m)  # 0.5 * 0 + 0.5 * 1
    m.weight.data.fill_(2.0)
    ema.update(m)  # 0.5 * 0.5 + 0.5 * 2
    assert torch.allclose(ema.state["weight"], torch.tensor([[1.25]]))
    with ema.apply_to(m):
        assert m.weight.item() == 1.25
    assert m.weight.item() == 2.0  # restored
    restored = ModelEMA(m, decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert torch.equal(restored.state["weight"], ema.state["weight"])


def test_ema_hook_restarts_an_unrestored_average_from_the_loaded_weights():
    """Built before the weights are loaded, the average restarts from them when training starts;
    an average restored from a checkpoint (``--resume``) is kept."""
    m = nn.Linear(1, 1, bias=False)
    m.weight.data.fill_(0.0)
    fresh, resumed = ModelEMA(m, decay=0.5), ModelEMA(m, decay=0.5)
    saved = ModelEMA(m, decay=0.5)
    saved.state["weight"].fill_(7.0)
    resumed.load_state_dict(saved.state_dict())
    m.weight.data.fill_(4.0)  # what resume_or_load loaded
    EMAHook(fresh, m).before_train()
    EMAHook(resumed, m).before_train()
    assert fresh.state["weight"].item() == 4.0
    assert resumed.state["weight"].item() == 7.0


def test_weight_decay_schedule():
    ms = (300, 600)
    assert weight_decay_multiplier(0, ms, 0.5) == 1.0
    assert weight_decay_multiplier(149, ms, 0.5) == 1.0
    assert abs(weight_decay_multiplier(150, ms, 0.5) - 0.1) < 1e-12
    assert abs(weight_decay_multiplier(300, ms, 0.5) - 0.01) < 1e-12


def test_ema_weights_the_average_by_decay_and_copies_integer_buffers():
    m = nn.BatchNorm1d(1)
    m.weight.data.fill_(0.0)
    ema = ModelEMA(m, decay=0.75)
    m.weight.data.fill_(4.0)
    m.num_batches_tracked.fill_(7)
    ema.update(m)  # 0.75 * 0 + 0.25 * 4 = 1
    assert ema.state["weight"].item() == 1.0
    assert ema.state["num_batches_tracked"].item() == 7  # not averaged: the current count
    partial = {"decay": 0.75, "state": {"weight": torch.ones(1)}}
    with pytest.raises(KeyError, match="model_ema checkpoint lacks 4 keys"):
        ModelEMA(m, decay=0.75).load_state_dict(partial)


def test_weight_decay_hook_scales_the_initial_decay_without_compounding():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "weight_decay": 0.01}], lr=0.1)
    for g in opt.param_groups:
        g["initial_weight_decay"] = g["weight_decay"]
    hook = WeightDecayScheduleHook(opt, milestones=(100,), ratio=0.5)
    hook.trainer = types.SimpleNamespace(iter=60)
    hook.before_step()
    hook.before_step()  # the same iteration again (e.g. after a resume): still x0.1, not x0.01
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.001)
    hook.trainer.iter = 10
    hook.before_step()
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.01)


def test_weight_decay_hook_follows_the_scheduler_steps_when_given():
    """FIBER reads the LR scheduler's count, which lags the iteration by the skipped batches."""
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "weight_decay": 0.01}], lr=0.1)
    for g in opt.param_groups:
        g["initial_weight_decay"] = g["weight_decay"]
    scheduler = types.SimpleNamespace(last_epoch=49)
    hook = WeightDecayScheduleHook(opt, milestones=(100,), ratio=0.5, scheduler=scheduler)
    hook.trainer = types.SimpleNamespace(iter=60)  # 11 batches skipped so far
    hook.before_step()
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.01)
    scheduler.last_epoch = 50
    hook.before_step()
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.001)


def test_ema_leaves_the_queues_to_the_run():
    """The coarse stage's queues (modules marked fresh_each_run) are run state: not averaged, not
    copied, and the model keeps its own while the averaged weights are applied."""
    from fiber_d2.modeling.meta_arch.coarse_losses import FeatureQueue

    m = nn.Module()
    m.proj = nn.Linear(1, 1, bias=False)
    m.queue = FeatureQueue(dim=2, size=3)
    m.queue.hold_inputs(image_size=2, text_length=2, pad_token_id=1)
    m.proj.weight.data.fill_(0.0)
    ema = ModelEMA(m, decay=0.5)
    assert set(ema.state) == {"proj.weight"}
    m.proj.weight.data.fill_(2.0)
    images = torch.full((1, 3, 2, 2), 9, dtype=torch.uint8)
    m.queue.enqueue(
        torch.ones(1, 2), torch.ones(1, 2), (images, torch.ones(1, 2), torch.ones(1, 2))
    )
    ema.update(m)
    m.queue.enqueue(
        torch.ones(1, 2), torch.ones(1, 2), (images, torch.ones(1, 2), torch.ones(1, 2))
    )
    with ema.apply_to(m):  # the averaged weights with the live queue (2 samples)
        assert m.proj.weight.item() == 1.0 and m.queue.queue_total.item() == 2
        assert m.queue.image_input_queue[:2].eq(9).all()
    assert m.proj.weight.item() == 2.0
