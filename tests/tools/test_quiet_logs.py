"""Logs of the tools: the converter's summary once, no fvcore TorchScript warning (the converter,
the projects' train_net.py, the tools that import fvcore), one namespace."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT.parent / "shared" / "fixtures" / "original_fine_tiny"


def _run(tool, *args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / tool), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


@pytest.mark.skipif(not (FIX / "state_original.safetensors").exists(), reason="no fixture")
def test_converter_summary_is_printed_once(tmp_path):
    import torch
    from safetensors.torch import load_file

    src = tmp_path / "original.pth"
    torch.save({"model": load_file(str(FIX / "state_original.safetensors"))}, src)
    proc = _run(
        "convert_fiber_checkpoint.py", "--input", str(src), "--output", "out.pth", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout + proc.stderr
    assert text.count("tensors mapped") == 1
    assert "torch.jit.script" not in text


def test_library_loggers_share_the_fiber_d2_namespace():
    import fiber_d2  # noqa: F401  (imports every module)

    names = [n for n in logging.root.manager.loggerDict if "fiber" in n.lower()]
    assert names and all(n == "fiber_d2" or n.startswith("fiber_d2.") for n in names), names


# one project train_net of each import layout, and a tool that imports fvcore itself
@pytest.mark.parametrize(
    "script",
    ["projects/VQA/train_net.py", "projects/Retrieval/train_net.py", "tools/analyze_model.py"],
)
def test_no_fvcore_torchscript_warning(script):
    """fiber_d2 silences fvcore's import-time TorchScript deprecation warning, which works only
    when it is imported before detectron2 / fvcore; each entry point does so."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), "--help"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage" in proc.stdout and "torch.jit.script" not in proc.stderr
