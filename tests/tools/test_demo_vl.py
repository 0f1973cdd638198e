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
    assert [name for name, _, _ in demo_vl.RUNNERS] == ["retrieval", "vqa", "nlvr2", "captioning"]
    for _, project, module in demo_vl.RUNNERS:
        assert callable(demo_vl.load_runner(project, module))
    with pytest.raises(SystemExit, match="unknown --tasks"):
        demo_vl.main(["--output-dir", str(tmp_path), "--tasks", "captions"])
    with pytest.raises(SystemExit, match="not found"):
        demo_vl.main(["--output-dir", str(tmp_path), "--coarse-weights", str(tmp_path / "no.pth")])


def test_a_two_argument_runner_plugs_in_with_one_line(tmp_path, monkeypatch):
    """A runner with the bare signature run(coarse_weights, output_dir) (e.g. captioning)."""
    from fiber_d2.engine.shapes_demo import task_result

    seen = []

    def run(coarse_weights, output_dir):
        seen.append((coarse_weights, output_dir))
        return task_result("toy", "score", 70.0, 10.0, 1.0, [])

    weights = tmp_path / "coarse.pth"
    weights.write_bytes(b"")
    monkeypatch.setattr(demo_vl, "RUNNERS", [*demo_vl.RUNNERS, ("toy", "Toy", "toy.shapes_demo")])
    monkeypatch.setattr(demo_vl, "load_runner", lambda project, module: run)
    out = tmp_path / "out"
    summary = demo_vl.main(
        ["--output-dir", str(out), "--coarse-weights", str(weights), "--tasks", "toy", "--ablation",
         "SOLVER.MAX_ITER", "1"]
    )  # fmt: skip
    assert seen == [(str(weights), out / "toy"), (None, out / "toy_scratch")]
    assert summary["tasks"][0]["scratch"]["value"] == 70.0
    assert "| toy | score | 70.00 | 70.00 | 10.00 () | 0.0 |" in (out / "summary.md").read_text()
