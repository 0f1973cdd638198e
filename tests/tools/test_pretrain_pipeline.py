"""tools/pretrain_pipeline.py (``make demo``): a stage that fails ends the pipeline with one error
line naming the stage and its log, after the stage's own error line, not with a traceback."""

import pytest
from tool_scripts import load_tool


def test_failed_stage_is_one_error_line(tmp_path):
    pipeline = load_tool("pretrain_pipeline")
    missing = tmp_path / "missing.yaml"
    with pytest.raises(SystemExit) as err:
        pipeline.main(["--coarse-config", str(missing), "--output-dir", str(tmp_path / "out")])
    message = str(err.value.code)
    assert "\n" not in message
    assert message.startswith(f"error: stage {missing} failed (exit status 1")
    assert str(tmp_path / "out" / "coarse" / "log.txt") in message and "--resume" in message
