"""EMA averaging/resume and the stateless weight-decay schedule."""

import torch
from torch import nn

from fiber_d2.engine.hooks import ModelEMA, weight_decay_multiplier


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


def test_weight_decay_schedule():
    ms = (300, 600)
    assert weight_decay_multiplier(0, ms, 0.5) == 1.0
    assert weight_decay_multiplier(149, ms, 0.5) == 1.0
    assert abs(weight_decay_multiplier(150, ms, 0.5) - 0.1) < 1e-12
    assert abs(weight_decay_multiplier(300, ms, 0.5) - 0.01) < 1e-12
