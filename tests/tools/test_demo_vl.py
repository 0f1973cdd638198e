"""tools/demo_vl.py end to end with a tiny coarse checkpoint: every runner, summary files, pictures."""

import json

import pytest
import torch
from detectron2.modeling import build_model
from tool_scripts import load_tool

from fiber_d2.engine.setup import load_config

demo_vl = load_tool("demo_vl")

TINY = [
    "MODEL.SWIN.DEPTHS", "[2, 2, 2, 2]",
    "MODEL.FIBER.NUM_FUSION_LAYERS", "2",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.MAX_ITER", "2",
    "SOLVER.WARMUP_ITERS", "1",
]  # fmt: skip
SMALL_INPUT = ["INPUT.IMAGE_SIZE", "64", "MODEL.SWIN.WINDOW_SIZE", "2"]


def test_runners_summary_and_pictures(tmp_path):
    torch.manual_seed(0)
    coarse = build_model(load_config(str(demo_vl.COARSE_CONFIG), TINY))
    weights = tmp_path / "coarse.pth"
    torch.save({"model": coarse.state_dict()}, weights)
    out = tmp_path / "demo_vl"
    summary = demo_vl.main(
        ["--output-dir", str(out), "--coarse-weights", str(weights), "--tasks", "vqa,nlvr2",
         *TINY, *SMALL_INPUT]
    )  # fmt: skip
    rows = {r["task"]: r for r in summary["tasks"]}
    assert set(rows) == {"VQA", "NLVR2"}
    for row in rows.values():
        assert 0.0 <= row["value"] <= 100.0 and 0.0 < row["baseline"] < 100.0
        assert len(row["pictures"]) == 4
    assert rows["NLVR2"]["baseline"] == pytest.approx(50.0)  # balanced labels
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["coarse_weights"] == str(weights) and on_disk["coarse_seconds"] == 0.0
    table = (out / "summary.md").read_text()
    assert "| VQA | accuracy |" in table and "| NLVR2 | accuracy |" in table
    for row in rows.values():
        for picture in row["pictures"]:
            assert picture.endswith(".png") and (tmp_path / picture).is_file()


def test_runner_list_and_bad_arguments(tmp_path):
    assert [name for name, _, _ in demo_vl.RUNNERS] == ["retrieval", "vqa", "nlvr2"]
    for _, project, module in demo_vl.RUNNERS:
        assert callable(demo_vl.load_runner(project, module))
    with pytest.raises(SystemExit, match="unknown --tasks"):
        demo_vl.main(["--output-dir", str(tmp_path), "--tasks", "captions"])
    with pytest.raises(SystemExit, match="not found"):
        demo_vl.main(["--output-dir", str(tmp_path), "--coarse-weights", str(tmp_path / "no.pth")])
