"""tools/deploy/export_model.py: bad input ends with one clear line, before anything is traced."""

from pathlib import Path

import pytest
from tool_scripts import load_tool

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tool():
    return load_tool("deploy/export_model")


def test_coarse_config_names_supported_exports(tool, tmp_path):
    argv = ["--config-file", str(ROOT / "configs/Demo/coarse_tiny.yaml"), "--format", "onnx"]
    with pytest.raises(SystemExit) as exc:
        tool.main(argv + ["--output", str(tmp_path), "--opts", "MODEL.DEVICE", "cpu"])
    message = str(exc.value.code)
    assert message.startswith("error: MODEL.META_ARCHITECTURE 'FIBERCoarse' cannot be exported")
    assert "onnx, torchscript" in message and "'FIBER'" in message
    assert not any(tmp_path.iterdir())


def test_unknown_format_is_refused(tool, tmp_path):
    argv = ["--config-file", str(ROOT / "configs/Demo/fine_tiny.yaml"), "--format", "tensorrt"]
    with pytest.raises(SystemExit) as exc:
        tool.main(argv + ["--output", str(tmp_path)])
    assert exc.value.code == 2  # argparse: invalid choice


def test_phrases_need_a_caption(tool, tmp_path):
    argv = ["--config-file", str(ROOT / "configs/Demo/fine_tiny.yaml"), "--format", "onnx"]
    with pytest.raises(SystemExit) as exc:
        tool.main(argv + ["--output", str(tmp_path), "--prompt", "cat", "--phrases", "cat"])
    assert str(exc.value.code) == "error: --phrases needs --caption"


def test_benchmark_export_task_refuses_coarse_config():
    bench = load_tool("benchmark")
    argv = ["--config-file", str(ROOT / "configs/Demo/coarse_tiny.yaml"), "--task", "export"]
    with pytest.raises(SystemExit) as exc:
        bench.main(argv + ["--device", "cpu"])
    assert str(exc.value.code) == (
        "error: --task export needs the fine-grained detector (FIBER) config"
    )
