"""tools/demo_vl.py end to end with a tiny coarse checkpoint: every runner, summary files, pictures."""

import importlib
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from detectron2.data import DatasetCatalog
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


def _write_stage_output(cmd) -> None:
    """What a finished training stage leaves: model_final.pth (named by last_checkpoint), then the
    tower's export, then results.json."""
    out = Path(cmd[cmd.index("OUTPUT_DIR") + 1])
    out.mkdir(parents=True, exist_ok=True)
    (out / "model_final.pth").write_bytes(b"")
    (out / "last_checkpoint").write_text("model_final.pth")
    if "ImageTower" in cmd[1]:
        (out / "swin_weights.pth").write_bytes(b"")
    (out / "results.json").write_text("{}")


@pytest.mark.long(1)
def test_runners_summary_and_pictures(tmp_path):
    torch.manual_seed(0)
    coarse = build_model(load_config(str(demo_vl.COARSE_CONFIG), TINY + ["MODEL.SWIN.WEIGHTS", ""]))
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
    # the breakdowns cover the test set: their parts, weighted by size, give the row's value
    statement_kind = importlib.import_module("nlvr2.shapes_demo").statement_kind
    vqa_test, nlvr2_test = (DatasetCatalog.get(f"shapes_val_{t}") for t in ("vqa", "nlvr2"))
    sizes = {
        "VQA": Counter(r["question_type"] for r in vqa_test),
        "NLVR2": Counter(statement_kind(r["sentence"]) for r in nlvr2_test),
    }
    for task, row in rows.items():
        parts = row["breakdown"]["rows"]
        assert set(parts) == set(sizes[task]) and len(parts) >= 3
        n = sum(sizes[task].values())
        weighted = sum(parts[k]["value"] * c for k, c in sizes[task].items()) / n
        assert weighted == pytest.approx(row["value"])
        prior = sum(parts[k]["baseline"] * c for k, c in sizes[task].items()) / n
        if task == "VQA":
            assert prior == pytest.approx(row["other_baselines"]["answer prior per question type"])
    assert "VQA accuracy by question type:" in table and "NLVR2 accuracy by statement:" in table
    assert "| exists |" in table and "| both images contain ... |" in table
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
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit, match="^error: --output-dir .*a_file/out cannot be written"):
        demo_vl.main(["--output-dir", str(tmp_path / "a_file" / "out")])


def test_a_two_argument_runner_plugs_in_with_one_line(tmp_path, monkeypatch):
    """A runner with the bare signature run(coarse_weights, output_dir)."""
    from fiber_d2.engine.shapes_demo import task_result

    seen = []

    def run(coarse_weights, output_dir):
        seen.append((coarse_weights, output_dir))
        part = {"value": 60.0 if coarse_weights else 40.0, "baseline": 5.0}
        breakdown = {"by": "part", "baseline_name": "prior", "rows": {"a": part}}
        return task_result("toy", "score", 70.0, 10.0, 1.0, [], breakdown=breakdown)

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
    table = (out / "summary.md").read_text()
    assert "| toy | score | 70.00 | 70.00 | 10.00 () | 0.0 |" in table
    assert "toy score by part:\n\n| part | coarse -> task | scratch -> task | prior |" in table
    assert "| a | 60.00 | 40.00 | 5.00 |" in table


def test_pipeline_trains_the_image_tower_then_the_coarse_stage_from_it(tmp_path, monkeypatch):
    """Without --coarse-weights: the image tower's pre-training, then the coarse stage with
    MODEL.SWIN.WEIGHTS on its export; files already there are reused, not trained again."""
    commands = []

    def fake_train(cmd, what, resume=False):
        assert not resume
        commands.append((what, cmd))
        _write_stage_output(cmd)
        return 60.0

    monkeypatch.setattr(demo_vl, "_train", fake_train)
    monkeypatch.setattr(demo_vl, "RUNNERS", [])
    out = tmp_path / "out"
    summary = demo_vl.main(["--output-dir", str(out), "--tasks", ""])
    (tower_what, tower_cmd), (coarse_what, coarse_cmd) = commands
    assert tower_what == "the image tower" and tower_cmd[1] == str(demo_vl.TOWER_TRAIN_NET)
    assert tower_cmd[tower_cmd.index("--config-file") + 1] == str(demo_vl.TOWER_CONFIG)
    assert coarse_what == "the coarse stage"
    assert coarse_cmd[coarse_cmd.index("--config-file") + 1] == str(demo_vl.COARSE_CONFIG)
    swin = coarse_cmd[coarse_cmd.index("MODEL.SWIN.WEIGHTS") + 1]
    assert swin == str(out / "image_tower" / "swin_weights.pth")
    assert summary["coarse_weights"] == str(out / "coarse" / "model_final.pth")
    assert summary["image_tower_seconds"] == 60.0 and summary["coarse_seconds"] == 60.0
    assert "image tower: 1.0 min; coarse stage: 1.0 min" in (out / "summary.md").read_text()
    assert "MODEL.DEVICE" not in tower_cmd + coarse_cmd
    # where and how the stages run follows the overrides (MODEL.DEVICE cuda trained both stages on
    # the CPU); what the tasks alone learn does not reach them
    commands.clear()
    for stage in ("image_tower", "coarse"):
        shutil.rmtree(out / stage)
    opts = ["MODEL.DEVICE", "cuda", "SOLVER.MAX_ITER", "5", "SOLVER.AMP.ENABLED", "True"]
    demo_vl.main(["--output-dir", str(out), "--tasks", "", *opts])
    for _, cmd in commands:
        assert cmd[-6:] == [
            "MODEL.DEVICE",
            "cuda",
            "SOLVER.AMP.ENABLED",
            "True",
            "OUTPUT_DIR",
            cmd[-1],
        ]
        assert "SOLVER.MAX_ITER" not in cmd
    # a second run reuses both; an explicit tower is used instead of training one
    commands.clear()
    demo_vl.main(["--output-dir", str(out), "--tasks", ""])
    assert commands == []
    # not finished, so not reused: a final whose evaluation was killed (results.json older than it),
    # an earlier run's files in a folder a new run started over in (last_checkpoint names another)
    os.utime(out / "coarse" / "results.json", (0, 0))
    demo_vl.main(["--output-dir", str(out), "--tasks", ""])
    assert [w for w, _ in commands] == ["the coarse stage"]
    commands.clear()
    (out / "image_tower" / "last_checkpoint").write_text("model_0000499.pth")
    (out / "coarse" / "last_checkpoint").write_text("model_0000099.pth")
    demo_vl.main(["--output-dir", str(out), "--tasks", ""])
    assert [w for w, _ in commands] == ["the image tower", "the coarse stage"]
    commands.clear()
    (out / "coarse" / "model_final.pth").unlink()
    tower = tmp_path / "my_swin.pth"
    tower.write_bytes(b"")
    demo_vl.main(["--output-dir", str(out), "--tasks", "", "--swin-weights", str(tower)])
    assert [w for w, _ in commands] == ["the coarse stage"]
    assert commands[0][1][commands[0][1].index("MODEL.SWIN.WEIGHTS") + 1] == str(tower)
    with pytest.raises(SystemExit, match="--swin-weights file not found"):
        (out / "coarse" / "model_final.pth").unlink()
        demo_vl.main(
            ["--output-dir", str(out), "--tasks", "", "--swin-weights", str(tmp_path / "no")]
        )


def test_resume_continues_the_training_stage_and_skips_finished_tasks(tmp_path, monkeypatch):
    """--resume: the image tower / coarse runs get train_net's --resume (before the KEY VALUE
    overrides, as detectron2's parser needs); a finished task is read back from its result.json
    when it ran with the same coarse checkpoint and overrides, and runs again otherwise."""
    from detectron2.engine import default_argument_parser

    from fiber_d2.engine.shapes_demo import task_result

    launched = []
    monkeypatch.setattr(demo_vl, "run_child", launched.append)
    cmd = ["python", "train_net.py", "--config-file", "c.yaml", "OUTPUT_DIR", "o"]
    demo_vl._train(cmd, "x", True)
    args = default_argument_parser().parse_args(launched[0][2:])
    assert args.resume and args.config_file == "c.yaml" and args.opts == ["OUTPUT_DIR", "o"]

    def fail(cmd):  # a stage killed or failing: one line naming its log, not a traceback
        raise demo_vl.subprocess.CalledProcessError(-9, cmd)

    monkeypatch.setattr(demo_vl, "run_child", fail)
    with pytest.raises(SystemExit, match=r"training the coarse stage failed .*o/log.txt.*--resume"):
        demo_vl._train(cmd, "the coarse stage")

    resumed = []

    def fake_train(cmd, what, resume=False):
        resumed.append((what, resume))
        _write_stage_output(cmd)
        return 1.0

    calls = []

    def run(coarse_weights, output_dir, opts=()):
        calls.append((coarse_weights, tuple(opts)))
        return task_result("toy", "score", 60.0 + len(calls), 10.0, 1.0, [])

    monkeypatch.setattr(demo_vl, "_train", fake_train)
    monkeypatch.setattr(demo_vl, "RUNNERS", [("toy", "Toy", "toy.shapes_demo")])
    monkeypatch.setattr(demo_vl, "load_runner", lambda project, module: run)
    out = tmp_path / "out"
    first = demo_vl.main(["--output-dir", str(out), "--resume", "--ablation"])
    assert resumed == [("the image tower", True), ("the coarse stage", True)]
    weights = str(out / "coarse" / "model_final.pth")
    assert calls == [(weights, ()), (None, ())]
    again = demo_vl.main(["--output-dir", str(out), "--resume", "--ablation"])
    assert len(calls) == 2 and again["tasks"] == first["tasks"]  # read back, not run
    demo_vl.main(["--output-dir", str(out), "--resume", "SEED", "1"])  # other overrides
    assert calls[2] == (weights, ("SEED", "1"))
    demo_vl.main(["--output-dir", str(out), "SEED", "1"])  # without --resume a task runs again
    assert len(calls) == 4
    (out / "toy" / demo_vl.RESULT_FILE).write_text("[1, 2")  # not a record: run again, no crash
    demo_vl.main(["--output-dir", str(out), "--resume", "SEED", "1"])
    assert len(calls) == 5
    assert json.loads((out / "toy" / demo_vl.RESULT_FILE).read_text())["row"]["value"] == 65.0


def test_retrieval_row_evaluates_with_the_coarse_stage_itc_settings():
    """The retrieval runner scores the coarse checkpoint with the ITC pooling / standardisation it
    was trained with (else its embeddings are not the ones ITC learned)."""
    demo_vl.load_runner("Retrieval", "retrieval.shapes_demo")
    runner = importlib.import_module("retrieval.shapes_demo")
    from retrieval import add_retrieval_config

    ours = load_config(runner.SHAPES_CONFIG, extra_defaults=(add_retrieval_config,))
    coarse = load_config(str(demo_vl.COARSE_CONFIG))
    for key, value in coarse.MODEL.COARSE.items():  # all but the training losses
        if key not in ("LOSSES", "LOSS_WEIGHTS"):
            assert ours.MODEL.COARSE[key] == value, key
    assert ours.MODEL.SWIN.WEIGHTS == ""
    assert ours.MODEL.COARSE.ITC_BATCH_NORM and ours.MODEL.COARSE.ITC_TEXT_POOL == "mean"
    assert ours.RETRIEVAL.MODE == "itc"


def test_a_task_stage_does_not_depend_on_what_ran_before(tmp_path):
    """The runners share one process: each task seeds from cfg.SEED, so its result is the same
    whatever consumed random numbers before it (another task, the --ablation row)."""
    from fiber_d2.engine.shapes_demo import train_and_evaluate

    demo_vl.load_runner("VQA", "vqa.shapes_demo")  # puts the project package on the path
    from vqa import VQATrainer, load_vqa_config

    config = str(demo_vl.ROOT / "projects" / "VQA" / "configs" / "shapes.yaml")
    weights = []
    for i, draws in enumerate((0, 1000)):
        cfg = load_vqa_config(config, TINY + SMALL_INPUT + ["OUTPUT_DIR", str(tmp_path / str(i))])
        cfg.DATASETS.TEST = ()
        cfg.freeze()
        torch.rand(draws)  # what an earlier task would have consumed
        _, model, _ = train_and_evaluate(VQATrainer, cfg)
        weights.append(model.state_dict())
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key


def test_the_retrieval_row_from_scratch_does_not_depend_on_what_ran_before(tmp_path):
    """Its random towers are drawn after seeding from cfg.SEED, as the training tasks' are."""
    demo_vl.load_runner("Retrieval", "retrieval.shapes_demo")
    runner = importlib.import_module("retrieval.shapes_demo")
    metrics = []
    for i, draws in enumerate((0, 1000)):
        torch.rand(draws)  # what an earlier task would have consumed
        row = runner.run(None, tmp_path / str(i), tuple(TINY + SMALL_INPUT))
        metrics.append(row["metrics"])
    assert metrics[0] == metrics[1]


def test_summary_table_lists_every_baseline_and_minutes():
    """Each row names the headline baseline and the others after it; seconds print as minutes."""
    row = {"task": "toy", "metric": "score", "value": 70.0, "baseline": 10.0, "seconds": 90.0}
    row.update(baseline_name="majority", other_baselines={"prior": 25.5, "chance": 5.0})
    table = demo_vl.summary_table([row], ablation=False)
    # 90 s = 1.5 minutes
    assert table.splitlines()[-1] == (
        "| toy | score | 70.00 | 10.00 (majority); 25.50 (prior); 5.00 (chance) | 1.5 |"
    )


def test_summary_keeps_each_stage_seconds_apart(tmp_path, monkeypatch):
    """summary.json and the footer name the image tower's and the coarse stage's own seconds."""
    seconds = {"the image tower": 120.0, "the coarse stage": 30.0}

    def fake_train(cmd, what, resume=False):
        _write_stage_output(cmd)
        return seconds[what]

    monkeypatch.setattr(demo_vl, "_train", fake_train)
    monkeypatch.setattr(demo_vl, "RUNNERS", [])
    out = tmp_path / "out"
    summary = demo_vl.main(["--output-dir", str(out), "--tasks", ""])
    assert (summary["image_tower_seconds"], summary["coarse_seconds"]) == (120.0, 30.0)
    on_disk = json.loads((out / "summary.json").read_text())
    assert (on_disk["image_tower_seconds"], on_disk["coarse_seconds"]) == (120.0, 30.0)
    assert "image tower: 2.0 min; coarse stage: 0.5 min" in (out / "summary.md").read_text()
