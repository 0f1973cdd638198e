"""tools/pretrain_pipeline.py (``make demo``): a stage that fails ends the pipeline with one error
line naming the stage and its log, after the stage's own error line, not with a traceback; the
summary puts retrieval next to chance."""

import os

import pytest
from detectron2.data import DatasetCatalog
from tool_scripts import load_tool

import fiber_d2  # noqa: F401  (registers the shapes datasets)


def test_failed_stage_is_one_error_line(tmp_path):
    pipeline = load_tool("pretrain_pipeline")
    coarse = os.path.join(
        os.path.dirname(pipeline.TRAIN_NET), "..", "configs/Demo/coarse_tiny.yaml"
    )
    opts = ["DATASETS.TRAIN", "('no_such_dataset',)"]  # refused by the stage's own pre-run check
    with pytest.raises(SystemExit) as err:
        pipeline.main(["--coarse-config", coarse, "--output-dir", str(tmp_path / "out"), *opts])
    message = str(err.value.code)
    assert "\n" not in message
    assert message.startswith(f"error: stage {coarse} failed (exit status 1")
    assert "--resume" in message and "log.txt" not in message  # the stage wrote no log


@pytest.mark.parametrize("which", ["--coarse-config", "--fine-config"])
def test_a_missing_config_is_found_before_any_stage(which, tmp_path):
    """A missing fine config was found after the whole coarse stage had trained."""
    pipeline = load_tool("pretrain_pipeline")
    missing = tmp_path / "missing.yaml"
    with pytest.raises(SystemExit) as err:
        pipeline.main([which, str(missing), "--output-dir", str(tmp_path / "out")])
    message = str(err.value.code)
    assert message.startswith("error:") and str(missing) in message and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_unwritable_output_dir_is_one_error_line(tmp_path):
    pipeline = load_tool("pretrain_pipeline")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as err:
        pipeline.main(["--output-dir", str(tmp_path / "a_file" / "out")])
    assert (
        err.value.code
        == f"error: --output-dir {tmp_path}/a_file/out cannot be written: {tmp_path}/a_file is a file, not a folder"
    )


def test_summary_names_retrieval_chance_and_explains_it(monkeypatch, tmp_path, capsys):
    """Retrieval rows carry the recall of a random ranking (100 / test images); near it, with
    towers from scratch (the Demo), a line says why and where retrieval does learn."""
    pipeline = load_tool("pretrain_pipeline")
    stage_results = {
        "coarse": {"retrieval": {"TR@1": 1.5625, "IR@1": 2.0}},
        "fine": {"bbox": {"AP": 50.0, "AP50": 60.0}, "grounding": {"R@1": 80.0, "R@5": 99.0}},
    }
    monkeypatch.setattr(
        pipeline,
        "run_stage",
        lambda config, output_dir, *a, **k: stage_results[os.path.basename(output_dir)],
    )
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    pipeline.main(["--output-dir", str(out_dir)])
    printed = capsys.readouterr().out
    chance = 100.0 / len(DatasetCatalog.get("shapes_val_captions"))
    row = next(line for line in printed.splitlines() if line.startswith("retrieval IR@1"))
    assert row.endswith(f" 2.00  (chance {chance:.2f})")
    assert "retrieval near chance" in printed and "make demo-vl" in printed
    assert "(chance" not in pipeline.summary_table(stage_results)  # without a chance level
    stage_results["coarse"]["retrieval"] = {"TR@1": 40.0, "IR@1": 30.0}
    pipeline.main(["--output-dir", str(out_dir)])
    assert "retrieval near chance" not in capsys.readouterr().out


def test_resume_repeats_a_stage_whose_files_are_an_earlier_runs(monkeypatch, tmp_path):
    """--resume counted any model_final.pth + results.json as this run's finished stage: a run
    started over in a finished folder and killed at its first checkpoint was reported with the
    earlier run's figures, and its own checkpoints were never resumed."""
    import json

    pipeline = load_tool("pretrain_pipeline")
    launched = []
    monkeypatch.setattr(pipeline, "run_child", launched.append)
    out = tmp_path / "coarse"
    out.mkdir()
    (out / "model_final.pth").write_bytes(b"")
    (out / "results.json").write_text(json.dumps({"earlier": 1}))
    (out / "last_checkpoint").write_text("model_final.pth")
    assert pipeline.run_stage("c.yaml", str(out), [], resume=True, num_gpus=1) == {"earlier": 1}
    assert launched == []  # finished: not repeated
    (out / "last_checkpoint").write_text("model_0000099.pth")  # the new run's first checkpoint
    pipeline.run_stage("c.yaml", str(out), [], resume=True, num_gpus=1)
    assert len(launched) == 1 and "--resume" in launched[0]
    # a final whose evaluation was killed (results.json older than it) runs again too
    (out / "last_checkpoint").write_text("model_final.pth")
    os.utime(out / "results.json", (0, 0))
    pipeline.run_stage("c.yaml", str(out), [], resume=True, num_gpus=1)
    assert len(launched) == 2


def test_fine_stage_starts_from_the_coarse_final_unless_skipped(monkeypatch, tmp_path):
    """The fine stage gets MODEL.WEIGHTS <output-dir>/coarse/model_final.pth; --skip-coarse runs
    no coarse stage and starts the fine one from scratch; summary.json holds each stage's metrics
    with the test-set level flattened."""
    import json

    pipeline = load_tool("pretrain_pipeline")
    calls = []
    per_dataset = {
        "coarse": {"shapes_val_captions": {"retrieval": {"TR@1": 40.0, "IR@1": 30.0}}},
        "fine": {"shapes_val": {"bbox": {"AP": 50.0}}, "shapes_val_g": {"grounding": {"R@1": 9.0}}},
    }

    def fake_stage(config, output_dir, opts, *, resume, num_gpus):
        calls.append((os.path.basename(output_dir), list(opts)))
        return per_dataset[os.path.basename(output_dir)]

    monkeypatch.setattr(pipeline, "run_stage", fake_stage)
    out = tmp_path / "out"
    results = pipeline.main(["--output-dir", str(out), "SEED", "3"])
    coarse_final = os.path.join(str(out), "coarse", "model_final.pth")
    assert calls == [
        ("coarse", ["SEED", "3"]),
        ("fine", ["SEED", "3", "MODEL.WEIGHTS", coarse_final]),
    ]
    assert results["fine"] == {"bbox": {"AP": 50.0}, "grounding": {"R@1": 9.0}}
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["coarse"] == {"retrieval": {"TR@1": 40.0, "IR@1": 30.0}}
    calls.clear()
    results = pipeline.main(["--output-dir", str(out), "--skip-coarse", "SEED", "3"])
    assert calls == [("fine", ["SEED", "3"])] and "coarse" not in results


def test_without_resume_a_finished_stage_runs_again(monkeypatch, tmp_path):
    pipeline = load_tool("pretrain_pipeline")
    launched = []
    monkeypatch.setattr(pipeline, "run_child", launched.append)
    (tmp_path / "model_final.pth").write_bytes(b"")
    (tmp_path / "results.json").write_text("{}")
    (tmp_path / "last_checkpoint").write_text("model_final.pth")
    pipeline.run_stage("c.yaml", str(tmp_path), [], resume=False, num_gpus=2)
    assert len(launched) == 1 and "--resume" not in launched[0]
    assert launched[0][launched[0].index("--num-gpus") + 1] == "2"
