"""tools/train_net.py: one-line errors on bad input, and a 2-process CPU (gloo) run that trains and evaluates."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fiber_d2.engine.cli import cpu_threads_per_process, warn_if_starting_over
from fiber_d2.engine.setup import load_config

ROOT = Path(__file__).resolve().parents[2]
TRAIN_NET = str(ROOT / "tools" / "train_net.py")
CFG = str(ROOT / "configs" / "Demo" / "fine_tiny.yaml")


def _run(args, timeout=600, threads="1"):
    # one intra-op thread per process: two processes share the machine's cores without thrashing
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = threads
    return subprocess.run(
        [sys.executable, TRAIN_NET, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--config-file", "configs/nope.yaml"], "configs/nope.yaml"),
        (["--config-file", CFG, "MODEL.SWIN.NOT_A_KEY", "1"], "MODEL.SWIN.NOT_A_KEY"),
        (["--config-file", CFG, "DATASETS.TRAIN", "('no_such_set',)"], "no_such_set"),
        (["--config-file", CFG, "MODEL.WEIGHTS", "/no/such/weights.pth"], "/no/such/weights.pth"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, needle):
    out = tmp_path / "out"
    proc = _run([*args, "OUTPUT_DIR", str(out)])
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and needle in last
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def _cfg(device="cpu"):
    return load_config(CFG, ["MODEL.DEVICE", device])


def test_cpu_processes_share_the_cores():
    cores = len(os.sched_getaffinity(0))
    assert cpu_threads_per_process(_cfg(), 2, environ={}) == max(1, cores // 2)
    assert cpu_threads_per_process(_cfg(), 4 * cores, environ={}) == 1
    # one process, a GPU run, or the user's own OMP_NUM_THREADS: torch's setting stays
    assert cpu_threads_per_process(_cfg(), 1, environ={}) is None
    assert cpu_threads_per_process(_cfg("cuda"), 2, environ={}) is None
    assert cpu_threads_per_process(_cfg(), 2, environ={"OMP_NUM_THREADS": "3"}) is None


def test_the_cores_are_shared_by_the_process_count(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12)))
    shares = {n: cpu_threads_per_process(_cfg(), n, environ={}) for n in (2, 3, 5, 24)}
    assert shares == {2: 6, 3: 4, 5: 2, 24: 1}


@pytest.mark.long(1)
def test_two_cpu_processes_train_and_evaluate(tmp_path):
    out = tmp_path / "ddp"
    proc = _run(
        [
            "--config-file",
            CFG,
            "--num-gpus",
            "2",
            "MODEL.DEVICE",
            "cpu",
            "SOLVER.MAX_ITER",
            "3",
            "SOLVER.IMS_PER_BATCH",
            "2",
            "SOLVER.WARMUP_ITERS",
            "1",
            "MODEL.SWIN.DEPTHS",
            "[2, 2, 2, 2]",
            "MODEL.FIBER.NUM_FUSION_LAYERS",
            "2",
            "DATASETS.TEST",
            "('shapes_val_det',)",
            "INPUT.MIN_SIZE_TEST",
            "128",
            "OUTPUT_DIR",
            str(out),
        ],
        threads=None,  # the run shares the cores out itself
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (out / "log.txt").read_text()
    per_process = max(1, len(os.sched_getaffinity(0)) // 2)
    assert f"CPU processes on this machine: 2, intra-op threads each: {per_process}" in log
    assert "world size: 2" in log.lower() or "Rank of current process: 0. World size: 2" in log
    results = json.loads((out / "results.json").read_text())
    assert {"AP", "AP50"} <= set(results["bbox"])
    assert os.path.isfile(out / "model_final.pth")


def test_training_over_an_earlier_run_warns(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="fiber_d2.engine.cli"):
        assert not warn_if_starting_over(str(tmp_path))
        (tmp_path / "last_checkpoint").write_text("model_0000199.pth")
        assert warn_if_starting_over(str(tmp_path))
    (record,) = caplog.records
    assert "model_0000199.pth" in record.getMessage() and "--resume" in record.getMessage()
