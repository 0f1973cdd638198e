"""fiber_d2.engine.cli.launch_cli: a multi-process CPU run hides the GPUs from its workers."""

import os
import sys

import pytest
from detectron2.config import get_cfg

from fiber_d2 import add_fiber_config
from fiber_d2.engine import cli


def _cfg(device: str):
    cfg = get_cfg()
    add_fiber_config(cfg)
    cfg.MODEL.DEVICE = device
    return cfg


@pytest.mark.parametrize(
    "device,num_gpus,hidden",
    [("cpu", 2, True), ("cpu", 1, False), ("cuda", 2, False)],
)
def test_cpu_workers_do_not_see_the_gpus(monkeypatch, device, num_gpus, hidden):
    """detectron2's launch picks NCCL (and asserts N <= the GPU count) whenever CUDA is visible;
    the workers of ``--num-gpus N MODEL.DEVICE cpu`` must find none and take gloo."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    seen = {}

    def fake_launch(main, num_gpus_per_machine, **kwargs):
        seen["env"] = os.environ.get("CUDA_VISIBLE_DEVICES")
        seen["num_gpus"] = num_gpus_per_machine

    monkeypatch.setattr(cli, "launch", fake_launch)
    monkeypatch.setattr(cli, "validate_config", lambda cfg, training: None)
    monkeypatch.setattr(sys, "argv", ["train_net.py", "--num-gpus", str(num_gpus)])
    cli.launch_cli(lambda args: None, load=lambda path, opts: _cfg(device))
    assert seen == {"env": "" if hidden else "0", "num_gpus": num_gpus}
