"""Checkpoints and ``last_checkpoint`` appear whole or not at all, so a run killed while saving
resumes from its previous checkpoint; an empty ``last_checkpoint`` is one error line."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from detectron2.config import CfgNode

from fiber_d2.checkpoint import CheckpointError, load_checkpoint_file
from fiber_d2.checkpoint.checkpointer import FIBERCheckpointer, weights_to_load
from fiber_d2.checkpoint.safe_io import write_whole


def test_write_whole_leaves_the_previous_file_on_error(tmp_path):
    path = str(tmp_path / "f.bin")
    with write_whole(path) as f:
        f.write(b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        with write_whole(path) as f:
            f.write(b"half of the new")
            raise RuntimeError("disk full")
    assert open(path, "rb").read() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_interrupted_save_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    checkpointer = FIBERCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000001")
    saved = {k: v.clone() for k, v in model.state_dict().items()}

    real_save = torch.save

    def dies_half_way(data, f):  # as a process killed in the middle of torch.save
        f.write(b"PK\x03\x04 truncated")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_half_way)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save("model_0000002")
    monkeypatch.setattr(torch, "save", real_save)

    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    FIBERCheckpointer(model, str(tmp_path)).resume_or_load("", resume=True)
    assert torch.equal(model.weight, saved["weight"])


KILLED_WHILE_SAVING = """
import sys, torch
from fiber_d2.checkpoint.checkpointer import FIBERCheckpointer
model = torch.nn.Linear(2048, 2048)  # 16 MB: each save takes a while
checkpointer = FIBERCheckpointer(model, sys.argv[1])
print("ready", flush=True)
i = 0
while True:
    i += 1
    checkpointer.save(f"model_{i % 3:07d}")
"""


def test_checkpoints_survive_sigkill_while_saving(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(KILLED_WHILE_SAVING), str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ready"
    deadline = time.monotonic() + 120
    while not (tmp_path / "last_checkpoint").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # a few more saves: the kill lands in one of them, most likely mid-write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    last = (tmp_path / "last_checkpoint").read_text()
    checkpoints = sorted(p for p in os.listdir(tmp_path) if p.endswith(".pth"))
    assert last in checkpoints
    for name in checkpoints:  # every file under a checkpoint's name reads whole
        state = load_checkpoint_file(str(tmp_path / name))
        assert state["model"]["weight"].shape == (2048, 2048), name


def test_empty_last_checkpoint_is_one_error_line(tmp_path):
    (tmp_path / "model_0000199.pth").write_bytes(b"")
    (tmp_path / "last_checkpoint").write_text("")
    cfg = CfgNode({"OUTPUT_DIR": str(tmp_path), "MODEL": CfgNode({"WEIGHTS": ""})})
    with pytest.raises(CheckpointError, match="last_checkpoint is empty") as err:
        weights_to_load(cfg, resume=True)
    assert "model_0000199.pth" in str(err.value) and "\n" not in str(err.value)
    assert weights_to_load(cfg, resume=False) == ""
