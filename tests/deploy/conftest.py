"""The tiny eager detector shared by the deploy tests."""

import pytest
import torch
from test_export import FINE_CFG, TINY

from fiber_d2.engine.setup import load_config
from fiber_d2.predictor import FIBERPredictor


@pytest.fixture(scope="module")
def eager():
    torch.manual_seed(0)
    cfg = load_config(FINE_CFG, TINY)
    predictor = FIBERPredictor(cfg)
    # sharper token logits than the random init gives, so that scores spread over (0, 1)
    with torch.no_grad():
        predictor.model.head.log_scale.fill_(-2.0)
    return cfg, predictor
