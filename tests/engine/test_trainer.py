"""FIBERTrainer end to end on the tiny config: resume after an interruption, coarse-to-fine hand-off."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.engine import hooks
from detectron2.utils.events import EventStorage
from resumed_runs import Interrupt as _Interrupt
from resumed_runs import KillAt as _KillAt
from resumed_runs import finals_that_differ
from two_ranks import run_two_ranks

from fiber_d2.checkpoint.checkpointer import FIBERCheckpointer
from fiber_d2.engine.resume import EvalHookCatchingUp, ResumedJSONWriter
from fiber_d2.engine.setup import load_config
from fiber_d2.engine.trainer import FIBERTrainer

TINY = [
    "SOLVER.IMS_PER_BATCH",
    "2",
    "SOLVER.WARMUP_ITERS",
    "1",
    "TEST.EVAL_PERIOD",
    "0",
    "DATASETS.TEST",
    "()",
    "MODEL.SWIN.DEPTHS",
    "[2, 2, 2, 2]",
    "MODEL.FIBER.NUM_FUSION_LAYERS",
    "2",
]


def _cfg(path, out, *extra):
    cfg = load_config(path, TINY + ["OUTPUT_DIR", str(out), *extra])
    cfg.freeze()
    return cfg


def test_resume_continues_from_last_checkpoint(tmp_path):
    cfg = _cfg(
        "configs/Demo/fine_tiny.yaml",
        tmp_path,
        "SOLVER.MAX_ITER",
        "6",
        "SOLVER.CHECKPOINT_PERIOD",
        "3",
        "SOLVER.STEPS",
        "(4,)",
        "SOLVER.EMA.ENABLED",
        "True",
    )
    trainer = FIBERTrainer(cfg)
    trainer.register_hooks([_KillAt(4)])
    trainer.resume_or_load(resume=False)
    with pytest.raises(_Interrupt):
        trainer.train()
    ckpt = tmp_path / "model_0000002.pth"
    assert ckpt.is_file() and not (tmp_path / "model_final.pth").exists()
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["iteration"] == 2 and "model_ema" in saved and "trainer" in saved

    resumed = FIBERTrainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 3
    model = resumed.model
    for k, v in saved["model"].items():
        assert torch.equal(model.state_dict()[k], v), k
    steps = {int(s["step"]) for s in resumed.optimizer.state_dict()["state"].values()}
    assert steps == {3}  # AdamW state restored, not restarted
    assert torch.equal(resumed.ema.state["head.bias0"], saved["model_ema"]["state"]["head.bias0"])
    resumed.train()
    assert resumed.iter == 6  # detectron2 leaves iter at MAX_ITER after the last step
    assert (tmp_path / "model_final.pth").is_file()
    final = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=True)
    assert final["iteration"] == 5
    # the interrupted run's line of iteration 4 (after its checkpoint) is replaced by this run's
    lines = (tmp_path / "metrics.json").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [5]


def _writing_every_step(cfg, resume: bool, *extra_hooks) -> FIBERTrainer:
    """A trainer (resumed or not) with ``extra_hooks`` whose periodic writers write every step."""
    trainer = FIBERTrainer(cfg)
    trainer.register_hooks(list(extra_hooks))
    trainer.resume_or_load(resume=resume)
    (writer,) = [h for h in trainer._hooks if isinstance(h, hooks.PeriodicWriter)]
    writer._period = 1
    return trainer


def test_resume_before_the_first_checkpoint_starts_metrics_over(tmp_path):
    """A run killed before its first checkpoint resumes at iteration 0: it trains again from the
    start, so the lines the killed run wrote go (detectron2 would append after them)."""
    cfg = _cfg("configs/Demo/coarse_tiny.yaml", tmp_path, "SOLVER.MAX_ITER", "4")

    with pytest.raises(_Interrupt):
        _writing_every_step(cfg, False, _KillAt(2)).train()
    assert not list(tmp_path.glob("model_*.pth"))
    metrics = tmp_path / "metrics.json"
    assert [json.loads(line)["iteration"] for line in metrics.read_text().splitlines()] == [0, 1, 2]
    resumed = _writing_every_step(cfg, True)
    assert resumed.start_iter == 0
    resumed.train()
    lines = metrics.read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [0, 1, 2, 3]


def test_tensorboard_shows_a_resumed_runs_iterations_once(tmp_path):
    """The resumed run's event file purges the killed run's events from its first iteration on, as
    metrics.json drops their lines: TensorBoard shows one curve, not the killed run's points beside
    the resumed run's."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(
        "configs/Demo/coarse_tiny.yaml",
        tmp_path,
        "SOLVER.MAX_ITER",
        "6",
        "SOLVER.CHECKPOINT_PERIOD",
        "3",
    )

    with pytest.raises(_Interrupt):
        _writing_every_step(cfg, False, _KillAt(4)).train()
    resumed = _writing_every_step(cfg, True)
    assert resumed.start_iter == 3
    resumed.train()
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    steps = [e.step for e in events.Scalars("total_loss")]
    assert steps == [0, 1, 2, 3, 4, 5]
    lines = (tmp_path / "metrics.json").read_text().splitlines()
    json_losses = {json.loads(line)["iteration"]: json.loads(line)["total_loss"] for line in lines}
    for e in events.Scalars("total_loss"):  # the resumed run's values from iteration 3 on
        assert e.value == pytest.approx(json_losses[e.step], rel=1e-6)


def _write_metrics(path, start_iter: int, at: int, resuming: bool = False) -> list[int]:
    """One write of a loss at iteration ``at`` by the writer of a run started at ``start_iter``
    (with --resume or not); the iterations of metrics.json after it."""
    writer = ResumedJSONWriter(str(path), lambda: start_iter if resuming or start_iter else None)
    with EventStorage(start_iter=at) as storage:
        storage.put_scalar("loss", 0.5, smoothing_hint=False)
        writer.write()
    writer.close()
    return [json.loads(line)["iteration"] for line in path.read_text().splitlines()]


def test_a_resumed_runs_metrics_hold_each_iteration_once(tmp_path):
    """Resumed at iteration 40: the interrupted run's lines of iterations >= 40 and the line its
    kill cut short go at the first write (detectron2 appended after them); earlier lines stay, and
    a scalar this run writes for one of their iterations (a rerun evaluation) joins its line. A run
    started without --resume appends, as detectron2 does; one resumed before the interrupted run's
    first checkpoint (at iteration 0) drops all its lines."""
    path = tmp_path / "metrics.json"
    earlier = [json.dumps({"iteration": i, "loss": 1.0}) for i in (19, 39, 59)]
    path.write_text("\n".join(earlier) + '\n{"iteration": 7')
    writer = ResumedJSONWriter(str(path), lambda: 40)
    with EventStorage(start_iter=39) as storage:
        storage.put_scalar("bbox/AP", 50.0, smoothing_hint=False)
        storage.iter = 44
        storage.put_scalar("loss", 0.5, smoothing_hint=False)
        writer.write()
    writer.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [
        {"iteration": 19, "loss": 1.0},
        {"bbox/AP": 50.0, "iteration": 39, "loss": 1.0},
        {"iteration": 44, "loss": 0.5},
    ]
    assert _write_metrics(path, start_iter=0, at=3) == [19, 39, 44, 3]
    assert _write_metrics(path, start_iter=0, at=1, resuming=True) == [1]


def test_resume_after_a_kill_before_model_final_writes_it(tmp_path):
    """Killed after the last periodic checkpoint, while model_final was being written: the resumed
    run has no step left and still writes model_final (and removes the killed save's temporary)."""
    cfg = _cfg(
        "configs/Demo/coarse_tiny.yaml",
        tmp_path,
        "SOLVER.MAX_ITER",
        "4",
        "SOLVER.CHECKPOINT_PERIOD",
        "2",
    )
    trainer = FIBERTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    final = tmp_path / "model_final.pth"
    last = torch.load(tmp_path / "model_0000003.pth", map_location="cpu", weights_only=True)
    # the state a SIGKILL in the middle of model_final's save leaves: a partial temporary file of
    # the dead writer, last_checkpoint naming the periodic checkpoint of the same iteration
    final.unlink()
    (tmp_path / "last_checkpoint").write_text("model_0000003.pth")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"model_final.pth.tmp{dead.pid}"
    stale.write_bytes(b"partial")
    live = tmp_path / f"model_final.pth.tmp{os.getppid()}"  # a writer still running: kept
    live.write_bytes(b"in progress")

    resumed = FIBERTrainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 4 and not stale.exists() and live.exists()
    resumed.train()
    saved = torch.load(final, map_location="cpu", weights_only=True)
    assert saved["iteration"] == 3
    for k, v in last["model"].items():
        assert torch.equal(saved["model"][k], v), k


def test_an_earlier_runs_final_is_replaced_and_temporaries_go_on_any_start(tmp_path):
    """A finished run's folder, started over without --resume and killed while the new run's
    model_final was being written: --resume kept the earlier run's model_final.pth (any file
    there counted as this run's). And a kill before the first checkpoint was whole left its
    temporary file for good (only a resume from a checkpoint removed them, and only at the top)."""
    from fiber_d2.checkpoint import final_is_current

    cfg = _cfg("configs/Demo/coarse_tiny.yaml", tmp_path, "SOLVER.MAX_ITER", "4")
    cfg.defrost()
    cfg.SOLVER.CHECKPOINT_PERIOD = 2
    cfg.freeze()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "inference").mkdir()
    stale = [tmp_path / f"model_0000001.pth.tmp{dead.pid}"]
    stale.append(tmp_path / "inference" / f"results.json.tmp{dead.pid}")
    for path in stale:
        path.write_bytes(b"partial")
    trainer = FIBERTrainer(cfg)
    trainer.resume_or_load(resume=False)  # a fresh start, no checkpoint yet
    assert not any(path.exists() for path in stale)
    trainer.train()
    final = tmp_path / "model_final.pth"
    last = torch.load(tmp_path / "model_0000003.pth", map_location="cpu", weights_only=True)
    earlier = torch.load(final, map_location="cpu", weights_only=True)
    earlier["model"] = {
        k: v + 1 if v.is_floating_point() else v for k, v in earlier["model"].items()
    }
    torch.save(earlier, final)  # the earlier run's weights, not yet replaced by this run's
    (tmp_path / "last_checkpoint").write_text("model_0000003.pth")
    assert not final_is_current(str(tmp_path))

    resumed = FIBERTrainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 4
    resumed.train()
    saved = torch.load(final, map_location="cpu", weights_only=True)
    for k, v in last["model"].items():
        assert torch.equal(saved["model"][k], v), k
    assert final_is_current(str(tmp_path))


def _recording_trainer(cfg, resume: bool, calls: list, interrupt_at=None) -> FIBERTrainer:
    """A trainer (resumed or not) whose evaluation records the iteration it is logged at in
    ``calls`` (and stops the run when called at ``interrupt_at``, like a SIGKILL during it: no hook
    runs after it, so the writers do not flush). The periodic writers write every 2 iterations, as
    they write every evaluation iteration when its period is a multiple of theirs."""
    trainer = FIBERTrainer(cfg)
    trainer.resume_or_load(resume=resume)
    (hook,) = [h for h in trainer._hooks if isinstance(h, EvalHookCatchingUp)]
    (writer,) = [h for h in trainer._hooks if isinstance(h, hooks.PeriodicWriter)]
    writer._period = 2

    def evaluate():
        at = trainer.storage.iter
        if at == interrupt_at:
            for h in trainer._hooks:
                h.after_train = lambda: None
            raise _Interrupt
        calls.append(at)
        return {"probe": {"weights_sum": float(sum(p.sum() for p in trainer.model.parameters()))}}

    hook._func = evaluate
    return trainer


def test_resume_reruns_an_evaluation_the_kill_interrupted(tmp_path):
    """A periodic evaluation runs right after its iteration's checkpoint: a run killed during it
    resumes after it. The resumed run evaluates that checkpoint first; an evaluation that finished
    before the kill is not repeated."""
    cfg = _cfg(
        "configs/Demo/coarse_tiny.yaml",
        tmp_path,
        *("SOLVER.MAX_ITER", "8", "SOLVER.CHECKPOINT_PERIOD", "2", "TEST.EVAL_PERIOD", "2"),
    )
    first = []
    trainer = _recording_trainer(cfg, False, first, interrupt_at=3)
    with pytest.raises(_Interrupt):
        trainer.train()
    assert first == [1] and (tmp_path / "model_0000003.pth").is_file()
    assert (tmp_path / "last_evaluation").read_text() == "1\n"

    second = []
    resumed = _recording_trainer(cfg, True, second)
    assert resumed.start_iter == 4
    resumed.register_hooks([_KillAt(6)])  # killed after the evaluation of 5, before checkpoint 7
    with pytest.raises(_Interrupt):
        resumed.train()
    assert second == [3, 5]  # the interrupted evaluation first, at its own iteration
    assert (tmp_path / "last_evaluation").read_text() == "5\n"
    # its result is written at once (before evaluation 5 could replace it in the storage), with
    # the training scalars of iteration 3 that the killed run did not write (its checkpoint carries
    # them): one line, as an uninterrupted run writes an evaluation's iteration
    rows = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    assert sorted(row["iteration"] for row in rows) == [1, 3, 5, 6]
    (third_row,) = [row for row in rows if row["iteration"] == 3]
    assert {"probe/weights_sum", "total_loss", "lr", "time"} <= set(third_row)
    saved = torch.load(tmp_path / "model_0000003.pth", weights_only=True)
    unwritten = saved["trainer"]["hooks"]["EvalHookCatchingUp"]
    assert unwritten["iteration"] == 3
    assert third_row["total_loss"] == unwritten["scalars"]["total_loss"][0]

    third = []
    again = _recording_trainer(cfg, True, third)
    assert again.start_iter == 6
    again.train()
    assert third == [8]  # 5 finished before the kill: only the final evaluation (of weights 7)
    assert (tmp_path / "last_evaluation").read_text() == "7\n"

    fourth = []  # resumed with no step left: the final evaluation again, at MAX_ITER (not 9)
    last = _recording_trainer(cfg, True, fourth)
    assert last.start_iter == 8
    last.train()
    assert fourth == [8] and (tmp_path / "last_evaluation").read_text() == "7\n"


def test_a_kill_after_an_evaluation_before_its_write_reruns_it(tmp_path):
    """Killed after an evaluation finished but before the periodic writers (the next hook) wrote
    it: the evaluation is not yet recorded as done, so the resumed run reruns it, and metrics.json
    gets that iteration's line, with its training scalars, as an uninterrupted run writes it."""
    cfg = _cfg(
        "configs/Demo/coarse_tiny.yaml",
        tmp_path,
        *("SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "2", "TEST.EVAL_PERIOD", "2"),
    )
    first = []
    trainer = _recording_trainer(cfg, False, first)
    (writer,) = [h for h in trainer._hooks if isinstance(h, hooks.PeriodicWriter)]
    write = writer.after_step

    def killed_before_writing_3():
        if trainer.iter == 3:
            for h in trainer._hooks:
                h.after_train = lambda: None
            raise _Interrupt
        write()

    writer.after_step = killed_before_writing_3
    with pytest.raises(_Interrupt):
        trainer.train()
    assert first == [1, 3] and (tmp_path / "last_evaluation").read_text() == "1\n"
    second = []
    resumed = _recording_trainer(cfg, True, second)
    resumed.train()
    assert second == [3, 6]  # the rerun, then the final evaluation (of weights 5)
    rows = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    assert [row["iteration"] for row in rows] == [1, 3, 5, 6]
    assert {"probe/weights_sum", "total_loss"} <= set(rows[1])


def test_an_earlier_runs_evaluation_record_does_not_skip_this_runs(tmp_path):
    """A run started over in the folder of an earlier one and killed during an evaluation reruns it
    on --resume, although the earlier run had recorded an evaluation of the same iteration."""
    cfg = _cfg(
        "configs/Demo/coarse_tiny.yaml",
        tmp_path,
        *("SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "2", "TEST.EVAL_PERIOD", "2"),
    )
    (tmp_path / "last_evaluation").write_text("1\n")  # the earlier run's
    trainer = _recording_trainer(cfg, False, [], interrupt_at=1)
    with pytest.raises(_Interrupt):
        trainer.train()
    assert not (tmp_path / "last_evaluation").exists()
    calls = []
    resumed = _recording_trainer(cfg, True, calls)
    assert resumed.start_iter == 2
    resumed.train()
    assert calls == [1, 3, 6]


def test_a_checkpoint_saved_before_training_starts(tmp_path):
    """The evaluation hook's checkpoint state reads the event storage, which exists only while
    train() runs: a checkpoint saved before it (an evaluation every iteration is due at once) holds
    no hook state rather than failing."""
    cfg = _cfg("configs/Demo/coarse_tiny.yaml", tmp_path, "TEST.EVAL_PERIOD", "1")
    trainer = FIBERTrainer(cfg)
    trainer.resume_or_load(resume=False)
    (writer,) = [h for h in trainer._hooks if isinstance(h, hooks.PeriodicWriter)]
    writer._period = 1  # the writers write every iteration too
    trainer.checkpointer.save("before")
    saved = torch.load(tmp_path / "before.pth", weights_only=True)
    assert saved["trainer"]["iteration"] == 0
    assert "EvalHookCatchingUp" not in saved["trainer"]["hooks"]


def test_coarse_checkpoint_initialises_the_detector_backbone(tmp_path):
    coarse_dir, fine_dir = tmp_path / "coarse", tmp_path / "fine"
    coarse_cfg = _cfg("configs/Demo/coarse_tiny.yaml", coarse_dir, "SOLVER.MAX_ITER", "2")
    coarse = FIBERTrainer(coarse_cfg)
    coarse.resume_or_load(resume=False)
    coarse.train()
    coarse_state = torch.load(coarse_dir / "model_final.pth", weights_only=True)["model"]

    fine_cfg = _cfg("configs/Demo/fine_tiny.yaml", fine_dir, "SOLVER.MAX_ITER", "1")
    fine = FIBERTrainer.build_model(fine_cfg)
    FIBERCheckpointer(fine, str(fine_dir)).load(str(coarse_dir / "model_final.pth"))
    fine_state = fine.state_dict()
    tower_keys = [
        k for k in coarse_state if k.startswith(("backbone.image_tower.", "backbone.text_tower."))
    ]
    loaded = 0
    for k in tower_keys:
        target = "backbone.bottom_up." + k[len("backbone.") :]
        if target in fine_state and fine_state[target].shape == coarse_state[k].shape:
            assert torch.equal(fine_state[target], coarse_state[k]), target
            loaded += 1
    backbone_keys = [k for k in fine_state if k.startswith("backbone.bottom_up.")]
    # every detector backbone tensor comes from the coarse run, except the detector's own per-output
    # norms (image_tower.norm1-3, absent from the coarse model as in the original)
    detector_only = [k for k in backbone_keys if ".image_tower.norm" in k]
    assert len(detector_only) == 6
    assert loaded == len(backbone_keys) - len(detector_only)
    assert loaded > 100


def test_detectron2_inference_on_dataset_with_fiber_test_loader(tmp_path):
    """The README's evaluation lines: stock detectron2 evaluation on FIBERTrainer's test loader."""
    from detectron2.evaluation import COCOEvaluator, inference_on_dataset
    from detectron2.modeling import build_model

    # a random model scores below the default threshold: keep every box, so that AP is a number
    opts = ["DATASETS.TEST", '("shapes_val_det",)', "MODEL.ATSS.INFERENCE_TH", "0.0"]
    cfg = _cfg("configs/Demo/fine_tiny.yaml", tmp_path, *opts)
    model = build_model(cfg).eval()
    loader = FIBERTrainer.build_test_loader(cfg, "shapes_val_det")
    results = inference_on_dataset(model, loader, COCOEvaluator("shapes_val_det"))
    for key in ("AP", "AP50", "AP75"):  # numbers, not NaN: every image's boxes were scored
        assert 0.0 <= results["bbox"][key] <= 100.0, (key, results["bbox"][key])


def test_train_loader_groups_by_aspect_ratio_only_where_images_keep_it():
    """Base-FIBER.yaml's DATALOADER.ASPECT_RATIO_GROUPING True reaches every FIBER-B recipe: the
    detector's batches are grouped; the coarse stage's (square inputs) are plain random batches,
    as the original's image-text loader."""
    from detectron2.data.common import AspectRatioGroupedDataset

    small = ["MODEL.LANGUAGE_BACKBONE.TOKENIZER", "builtin:shapes", "DATALOADER.NUM_WORKERS", "0"]
    small += ["SOLVER.IMS_PER_BATCH", "2"]
    fine = load_config(
        "configs/FIBER-B/coco.yaml", [*small, "DATASETS.TRAIN", "('shapes_train_det',)"]
    )
    coarse = load_config(
        "configs/FIBER-B/coarse_pretrain.yaml",
        [*small, "DATASETS.TRAIN", "('shapes_train_captions',)", "INPUT.IMAGE_SIZE", "64"],
    )
    assert fine.DATALOADER.ASPECT_RATIO_GROUPING and coarse.DATALOADER.ASPECT_RATIO_GROUPING
    assert isinstance(FIBERTrainer.build_train_loader(fine), AspectRatioGroupedDataset)
    loader = FIBERTrainer.build_train_loader(coarse)
    assert not isinstance(loader, AspectRatioGroupedDataset)
    batch = next(iter(loader))
    assert len(batch) == 2 and all(d["image"].shape == (3, 64, 64) for d in batch)


def _ema_run(tmp_path, monkeypatch, *extra):
    """Two iterations of the tiny detector with EMA from a MODEL.WEIGHTS file whose ``head.bias0``
    is 3 above a fresh model's; the weights the final evaluation sees are recorded."""
    fresh = FIBERTrainer.build_model(_cfg("configs/Demo/fine_tiny.yaml", tmp_path / "w"))
    state = fresh.state_dict()
    state["head.bias0"] = state["head.bias0"] + 3.0
    weights = tmp_path / "weights.pth"
    torch.save({"model": state}, weights)
    seen = []

    def test(cls, cfg, model, evaluators=None):
        seen.append(model.state_dict()["head.bias0"].clone())
        return {}

    monkeypatch.setattr(FIBERTrainer, "test", classmethod(test))
    cfg = _cfg(
        "configs/Demo/fine_tiny.yaml",
        tmp_path / "run",
        "SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "()", "SOLVER.EMA.ENABLED", "True",
        "MODEL.WEIGHTS", str(weights), *extra,
    )  # fmt: skip
    trainer = FIBERTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return state["head.bias0"], trainer, seen


def test_ema_averages_from_the_loaded_weights_and_evaluation_reads_the_raw_ones(
    tmp_path, monkeypatch
):
    """As the original: the average starts from MODEL.WEIGHTS (its hook was built before they were
    loaded, and held the fresh model's 3-lower bias), and the evaluation at the end of training
    reads the raw weights, which model_final.pth holds as "model"."""
    loaded, trainer, seen = _ema_run(tmp_path, monkeypatch)
    raw = trainer.model.state_dict()["head.bias0"]
    ema = trainer.ema.state["head.bias0"]
    # two steps at decay 0.999 keep the average within 0.002 x the steps' change of the loaded value
    assert (ema - loaded).abs().max() <= 0.002 * (raw - loaded).abs().max() + 1e-6
    assert len(seen) == 1 and torch.equal(seen[0], raw)


def test_ema_for_evaluation_when_asked(tmp_path, monkeypatch):
    """``SOLVER.EMA.USE_FOR_EVAL`` (the original's USE_EMA_FOR_MONITOR): the evaluation reads the
    average."""
    _, trainer, seen = _ema_run(tmp_path, monkeypatch, "SOLVER.EMA.USE_FOR_EVAL", "True")
    assert len(seen) == 1 and torch.equal(seen[0], trainer.ema.state["head.bias0"])
    assert not torch.equal(seen[0], trainer.model.state_dict()["head.bias0"])


def test_test_loader_prompts_with_the_dataset_it_loads(tmp_path):
    """A set registered with detectron2's register_coco_instances has records without a
    ``dataset_name`` field: they were prompted with DATASETS.TEST's only set (another set's
    categories, silently) or failed when it listed none or two."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    for name, classes in (("own_animals", ["dog", "cat"]), ("own_fruit", ["apple", "pear"])):
        categories = [{"id": i + 1, "name": c} for i, c in enumerate(classes)]
        box = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 8, 8], "area": 64}
        image = {"id": 1, "file_name": "a.png", "height": 32, "width": 32}
        (tmp_path / f"{name}.json").write_text(
            json.dumps(
                {"images": [image], "annotations": [dict(box, iscrowd=0)], "categories": categories}
            )
        )
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_coco_instances(name, {}, str(tmp_path / f"{name}.json"), str(tmp_path))
    for test_sets in ("('own_fruit',)", "()", "('own_fruit', 'own_animals')"):
        cfg = _cfg("configs/Demo/fine_tiny.yaml", tmp_path / "out", "DATASETS.TEST", test_sets)
        (batch,) = list(FIBERTrainer.build_test_loader(cfg, "own_animals"))
        assert "dog" in batch[0]["caption"] and "apple" not in batch[0]["caption"], test_sets


def test_a_plain_detectron2_config_registers_its_datasets(tmp_path):
    """DATASETS.REGISTER was read only by fiber_d2's load_config: a config made with
    add_fiber_config + merge_from_file (README, own code) named sets that were not registered."""
    from detectron2.config import get_cfg
    from PIL import Image

    from fiber_d2.config import add_fiber_config

    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    image = {"id": 1, "file_name": "a.png", "height": 32, "width": 32}
    box = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 8, 8], "area": 64, "iscrowd": 0}
    categories = [{"id": 1, "name": "traffic cone"}]
    (tmp_path / "own.json").write_text(
        json.dumps({"images": [image], "annotations": [box], "categories": categories})
    )
    cfg = add_fiber_config(get_cfg())
    cfg.merge_from_file("configs/Demo/fine_tiny.yaml")
    entry = ["own_registered", str(tmp_path / "own.json"), str(tmp_path), {"traffic cone": "cone"}]
    cfg.DATASETS.REGISTER = [entry]
    cfg.DATASETS.TEST = ("own_registered",)
    (batch,) = list(FIBERTrainer.build_test_loader(cfg, "own_registered"))
    assert batch[0]["caption"].startswith("cone")


def test_saved_average_includes_the_step_of_its_iteration(tmp_path, monkeypatch):
    """The EMA hook runs before the checkpointer: model_final.pth holds the average after the last
    step, the one a resumed or evaluated run continues from."""
    _, trainer, _ = _ema_run(tmp_path, monkeypatch, "SOLVER.EMA.DECAY", "0.5")
    final = torch.load(tmp_path / "run" / "model_final.pth", map_location="cpu", weights_only=True)
    saved = final["model_ema"]["state"]
    assert saved.keys() == trainer.ema.state.keys()
    for k, v in trainer.ema.state.items():
        assert torch.equal(saved[k], v), k


def _lrs(max_iter, warmup_iters, warmup_factor):
    cfg = load_config(
        None,
        ["SOLVER.LR_SCHEDULER_NAME", "WarmupLinearDecayLR", "SOLVER.BASE_LR", "1.0"]
        + ["SOLVER.MAX_ITER", str(max_iter), "SOLVER.WARMUP_ITERS", str(warmup_iters)]
        + ["SOLVER.WARMUP_FACTOR", str(warmup_factor), "SOLVER.WARMUP_METHOD", "linear"],
    )
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = FIBERTrainer.build_lr_scheduler(cfg, optimizer)
    lrs = []
    for _ in range(max_iter):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_warmup_linear_decay_is_the_original_polynomial_schedule():
    """Coarse spec §5: linear warmup from 0 over WARMUP_ITERS, then linear decay to 0 at MAX_ITER
    (transformers' polynomial schedule, power 1, lr_end 0): step / W, then (T - step) / (T - W)."""
    expected = [0.0, 0.5] + [(10 - t) / 8 for t in range(2, 10)]
    assert _lrs(10, 2, 0.0) == pytest.approx(expected, abs=1e-9)
    # a run that is all warmup ramps linearly over all of it
    assert _lrs(4, 4, 0.0) == pytest.approx([0.0, 0.25, 0.5, 0.75], abs=1e-9)


def _drawing_evaluation(cfg, model, evaluators=None):
    torch.rand(3), np.random.rand(3), random.random()
    return {}


@pytest.mark.parametrize(
    "config, passes",
    [
        ("configs/Demo/fine_tiny.yaml", []),
        ("configs/Demo/coarse_tiny.yaml", []),
        ("configs/Demo/fine_tiny.yaml", ["SOLVER.IMS_PER_DEVICE", "1"]),  # 2 passes per step
    ],
    ids=["detector", "coarse", "detector_2_passes"],
)
def test_a_resumed_run_trains_as_the_uninterrupted_one(tmp_path, config, passes):
    """Killed after iteration 4 and resumed from the checkpoint of 2, a run reads the batches and
    draws the random numbers (augmentations, masks, negatives) that the uninterrupted run read and
    drew: its final weights are the uninterrupted run's, bit for bit. The resumed process starts
    from another seed, and the periodic evaluation in between changes nothing either."""
    extra = ["SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "3", "TEST.EVAL_PERIOD", "3"]

    def build(out):
        trainer = FIBERTrainer(_cfg(config, out, *extra, *passes))
        trainer.test = _drawing_evaluation  # draws random numbers, as a test loader does
        return trainer

    differ = finals_that_differ(build, tmp_path)
    assert not differ, differ[:5]


def test_a_run_resumed_with_a_larger_batch_reads_on_from_where_the_stream_stopped(tmp_path):
    """The checkpoint counts the indices read (3 steps of 2), not the steps: resumed with
    ``SOLVER.IMS_PER_BATCH 4``, the run reads the sampler's stream from index 6, not 3 x 4."""
    extra = ["SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "3"]
    trainer = FIBERTrainer(_cfg("configs/Demo/fine_tiny.yaml", tmp_path, *extra))
    trainer.register_hooks([_KillAt(4)])
    trainer.resume_or_load(resume=False)
    with pytest.raises(_Interrupt):
        trainer.train()
    cfg = _cfg("configs/Demo/fine_tiny.yaml", tmp_path, *extra, "SOLVER.IMS_PER_BATCH", "4")
    resumed = FIBERTrainer(cfg)
    resumed.register_hooks([_KillAt(3)])
    resumed.resume_or_load(resume=True)
    with pytest.raises(_Interrupt):
        resumed.train()
    sampler = resumed._trainer.data_loader.resumable_sampler
    assert (resumed.start_iter, sampler.start) == (3, 6)


def _two_rank_runs(rank, folder):
    """On each of two gloo processes: the coarse stage uninterrupted, then killed and resumed."""
    extra = ["SOLVER.IMS_PER_BATCH", "4", "INPUT.IMAGE_SIZE", "64", "MODEL.SWIN.WINDOW_SIZE", "2"]
    extra += ["SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "3"]
    return finals_that_differ(
        lambda out: FIBERTrainer(_cfg("configs/Demo/coarse_tiny.yaml", out, *extra)), folder
    )


@pytest.mark.long(0.5)
def test_a_two_process_run_resumes_as_the_uninterrupted_one(tmp_path):
    """Each process's generators travel to the checkpoint (only rank 0 saves), so a run on two
    processes resumes as it would have gone on too."""
    differ, _ = run_two_ranks(_two_rank_runs, tmp_path, str(tmp_path))
    assert differ == []
