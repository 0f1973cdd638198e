"""tools/benchmark.py: one JSON line per task (train / inference / backbone, detector and coarse),
one-line errors; fiber_d2.benchmark: synthetic inputs that follow the mappers' output contract,
peak-memory and saved-activation measurement.

No speed is asserted here (targets live in benchmark.SPEED_TARGETS_MS)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import transforms as T
from detectron2.engine import default_argument_parser
from detectron2.structures import BoxMode
from PIL import Image
from tool_scripts import load_tool

from fiber_d2 import add_fiber_config
from fiber_d2.benchmark import (
    REFERENCE_OVERRIDES,
    PeakMemory,
    SavedTensors,
    chunked_prompts,
    coarse_batch,
    detector_batch,
    input_size,
    reference_cfg,
)
from fiber_d2.data.caption_mapper import CaptionDatasetMapper
from fiber_d2.data.mapper import GroundingDatasetMapper
from fiber_d2.data.shapes import build_shapes_tokenizer
from fiber_d2.engine.setup import load_config

ROOT = Path(__file__).resolve().parents[2]
FINE = str(ROOT / "configs" / "Demo" / "fine_tiny.yaml")
COARSE = str(ROOT / "configs" / "Demo" / "coarse_tiny.yaml")
COMMON_KEYS = {
    "task", "config", "meta_architecture", "device", "device_name", "threads", "dtype", "height",
    "width", "batch", "iters", "warmup", "ms_median", "images_per_s", "peak_mem_mb", "params",
}  # fmt: skip
# Small overrides keep each run well under a second; the architecture stays the configured one.
SMALL = ["MODEL.SWIN.DEPTHS", "[2, 2, 2, 2]", "MODEL.FIBER.NUM_FUSION_LAYERS", "2"]


bench = load_tool("benchmark")


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _run(capsys, argv):
    record = bench.main(argv)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    parsed = []
    for ln in lines:
        try:
            parsed.append(json.loads(ln))
        except json.JSONDecodeError:
            continue
    assert len(parsed) == 1, lines  # exactly one JSON line
    assert parsed[0] == record
    return record


@pytest.mark.parametrize(
    "config,task,batch,size,extra_keys",
    [
        (FINE, "train", 2, (70, 100), {"fwd_ms_median", "bwd_ms_median", "fwd_bwd_peak_mem_mb"}),
        (FINE, "train-fwd-bwd", 1, (70, 100), {"fwd_ms_median", "bwd_ms_median", "loss"}),
        (FINE, "inference", 1, (70, 100), {"outputs"}),
        (FINE, "backbone", 1, (70, 100), {"fwd_peak_mem_mb", "fwd_bwd_ms_median", "tokens_per_s"}),
        (COARSE, "train", 2, (64, 64), {"fwd_ms_median", "loss", "trainable_params", "ema"}),
        (COARSE, "inference", 2, (64, 64), {"outputs"}),
    ],
)
def test_one_json_line_per_task(capsys, config, task, batch, size, extra_keys):
    h, w = size
    argv = ["--config-file", config, "--task", task, "--device", "cpu", "--iters", "2"]
    argv += ["--warmup", "0", "--batch", str(batch), "--height", str(h), "--width", str(w)]
    argv += ["--threads", "1", "--boxes", "3", *SMALL]
    rec = _run(capsys, argv)
    assert COMMON_KEYS | extra_keys <= set(rec)
    assert (rec["task"], rec["device"], rec["dtype"], rec["batch"]) == (
        task,
        "cpu",
        "float32",
        batch,
    )
    assert rec["meta_architecture"] == ("FIBERCoarse" if config == COARSE else "FIBER")
    for key in ("ms_median", "images_per_s", "peak_mem_mb", "params"):
        assert rec[key] > 0, key
    assert math.isclose(rec["images_per_s"], batch * 1000.0 / rec["ms_median"], rel_tol=0.01)
    if config == FINE:  # padded up to SIZE_DIVISIBILITY 32
        assert (rec["height"], rec["width"]) == (96, 128)
    else:  # the coarse model sees the S x S input as it is
        assert (rec["height"], rec["width"]) == (64, 64)
    if task.startswith("train"):  # the memory breakdown
        assert rec["params_mb"] == pytest.approx(rec["params"] * 4 / 2**20, abs=0.1)
        assert rec["grads_mb"] == pytest.approx(rec["trainable_params"] * 4 / 2**20, abs=0.1)
        assert rec["saved_activations_mb"] > 0
        assert 0 <= rec["after_fwd_mem_mb"] <= rec["fwd_peak_mem_mb"] <= rec["peak_mem_mb"]
        assert 0 <= rec["after_bwd_mem_mb"] <= rec["peak_mem_mb"]
    if task == "train-fwd-bwd":  # forward + backward only: no optimizer step, no EMA copy
        assert not {"step_ms_median", "ema", "ema_mb", "fwd_bwd_peak_mem_mb"} & set(rec)
        assert math.isfinite(rec["loss"])
        assert rec["fwd_ms_median"] + rec["bwd_ms_median"] <= rec["ms_median"] * 1.01
    if task == "train":
        assert math.isfinite(rec["loss"])
        assert 0 < rec["trainable_params"] <= rec["params"]
        assert rec["fwd_ms_median"] + rec["bwd_ms_median"] <= rec["ms_median"] * 1.01
    if task == "inference" and config == COARSE:
        assert rec["outputs"] == batch * (1 + 5)  # one image and five caption embeddings each


def test_params_match_the_model_and_amp_dtype(capsys):
    from detectron2.modeling import build_model

    cfg = load_config(FINE, SMALL)
    expected = sum(p.numel() for p in build_model(cfg).parameters())
    argv = ["--config-file", FINE, "--task", "train", "--device", "cpu", "--iters", "1"]
    argv += ["--warmup", "0", "--height", "64", "--width", "64", "--threads", "1", "--amp", *SMALL]
    rec = _run(capsys, argv)
    assert rec["params"] == expected
    assert rec["dtype"] == "bfloat16"  # a bare --amp on the CPU
    assert math.isfinite(rec["loss"])
    assert "target_ms" not in rec  # targets apply only to reference runs


def test_train_reports_the_ema_copy(capsys):
    from detectron2.modeling import build_model

    cfg = load_config(FINE, SMALL)
    state = build_model(cfg).state_dict()
    expected = sum(t.numel() * t.element_size() for t in state.values()) / 2**20
    argv = ["--config-file", FINE, "--task", "train", "--device", "cpu", "--iters", "1"]
    argv += ["--warmup", "0", "--height", "64", "--width", "64", "--threads", "1", *SMALL]
    rec = _run(capsys, [*argv, "SOLVER.EMA.ENABLED", "True"])
    assert rec["ema"] and rec["ema_mb"] == pytest.approx(expected, abs=0.1)
    rec = _run(capsys, [*argv, "SOLVER.EMA.ENABLED", "False"])
    assert not rec["ema"] and rec["ema_mb"] == 0.0


def test_saved_tensors_counts_activations_once_and_no_parameters():
    layer = torch.nn.Linear(1024, 8)
    x = torch.randn(256, 1024)  # 1 MiB
    with SavedTensors(layer) as saved:
        y = layer(x)  # saves x (and the weight, a parameter)
        z = (y * y).sum() + layer(x).sum()  # y twice (one storage), x again
    assert saved.mb == pytest.approx(1.0 + 256 * 8 * 4 / 2**20)
    z.backward()
    with saved:
        pass
    assert saved.mb == 0.0  # each block counts on its own


def test_mmap_threshold_is_set_and_recorded(capsys, monkeypatch):
    from fiber_d2.engine import memory

    monkeypatch.delenv(memory.MMAP_ENV, raising=False)
    monkeypatch.setattr(memory, "_current_mb", None)
    assert memory.apply_mmap_threshold(0) is None  # 0: glibc's dynamic default is left alone
    argv = ["--config-file", FINE, "--task", "train-fwd-bwd", "--device", "cpu", "--iters", "1"]
    argv += ["--warmup", "0", "--height", "64", "--width", "64", "--threads", "1", *SMALL]
    # 32 MiB: glibc's own upper bound for its dynamic threshold, harmless for the other tests
    assert _run(capsys, ["--mmap-threshold-mb", "32", *argv])["mmap_threshold_mb"] == 32.0
    assert _run(capsys, [*argv, "CPU_MMAP_THRESHOLD_MB", "2"])["mmap_threshold_mb"] == 2.0
    monkeypatch.setattr(memory, "_current_mb", None)
    monkeypatch.setenv(memory.MMAP_ENV, str(3 * 2**20))  # glibc read it at start: kept, reported
    assert _run(capsys, argv)["mmap_threshold_mb"] == 3.0
    monkeypatch.delenv(memory.MMAP_ENV)
    for bad in ("-1", "nan", "64"):  # glibc refuses more than 32 MiB; NaN compared as no value
        with pytest.raises(SystemExit) as exc:
            bench.main(["--mmap-threshold-mb", bad, *argv])
        assert str(exc.value.code).startswith("error: --mmap-threshold-mb must be between 0")
    # the package default (1 MiB; the Demo configs keep glibc's), and the process is left with it
    assert _run(capsys, [*argv, "CPU_MMAP_THRESHOLD_MB", "1"])["mmap_threshold_mb"] == 1.0


def test_an_mmap_threshold_from_the_environment_is_kept(monkeypatch):
    """glibc read MALLOC_MMAP_THRESHOLD_ at process start: the user's setting wins over the config."""
    from fiber_d2.engine import memory

    seen = []
    monkeypatch.setattr(memory, "set_mmap_threshold", seen.append)
    monkeypatch.setattr(memory, "_current_mb", None)
    monkeypatch.setenv(memory.MMAP_ENV, str(3 * 2**20))
    assert memory.apply_mmap_threshold(4) == 3.0
    monkeypatch.delenv(memory.MMAP_ENV)
    memory.apply_mmap_threshold(4)
    assert seen == [4]


def test_timed_runs_the_warmup_untimed():
    from fiber_d2.benchmark.probes import timed

    calls = []

    def fn():
        calls.append(len(calls))
        return {"phase": float(calls[-1])}

    times = timed(fn, torch.device("cpu"), iters=3, warmup=2)
    assert len(calls) == 5
    assert len(times["total"]) == 3
    assert times["phase"] == [2.0, 3.0, 4.0]  # the timed calls' own phases, not the warmup's


def test_median_is_robust_to_one_slow_iteration():
    from fiber_d2.benchmark.probes import median

    assert median([10.0, 11.0, 500.0]) == 11.0
    assert median([10.0, 12.0]) == 11.0


def test_train_net_applies_the_mmap_threshold(tmp_path, monkeypatch):
    from fiber_d2.engine import memory
    from fiber_d2.engine.cli import run

    monkeypatch.delenv(memory.MMAP_ENV, raising=False)
    monkeypatch.setattr(memory, "_current_mb", None)
    seen = []
    monkeypatch.setattr(memory, "set_mmap_threshold", seen.append)
    monkeypatch.setattr("fiber_d2.engine.cli.check_before_run", lambda *a, **k: None)

    class Stop(Exception):
        pass

    class Trainer:
        def __init__(self, cfg):
            raise Stop

    args = default_argument_parser().parse_args(
        ["--config-file", FINE, "OUTPUT_DIR", str(tmp_path), "CPU_MMAP_THRESHOLD_MB", "4"]
    )
    with pytest.raises(Stop):
        run(args, Trainer)
    assert seen == [4]


def test_default_size_is_the_configured_test_size():
    cfg = load_config(FINE, [])
    args = bench._parser().parse_args(["--config-file", FINE])
    assert input_size(cfg, args) == (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    args = bench._parser().parse_args(["--config-file", FINE, "--height", "50"])
    assert input_size(cfg, args) == (50, cfg.INPUT.MAX_SIZE_TEST)
    coarse = load_config(COARSE, [])
    args = bench._parser().parse_args(["--config-file", COARSE])
    assert input_size(coarse, args) == (coarse.INPUT.IMAGE_SIZE,) * 2


def test_detector_batch_matches_the_mapper_contract(tmp_path):
    cfg = load_config(FINE, [])
    t_len = cfg.MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN
    batch = detector_batch(cfg, 2, 40, 60, num_boxes=5, seed=1)
    # the real mapper on a real image, for the reference contract
    tok_dir = tmp_path / "tok"
    build_shapes_tokenizer(tok_dir)
    image = tmp_path / "im.png"
    Image.fromarray(np.full((40, 60, 3), 128, np.uint8)).save(image)
    mapper = GroundingDatasetMapper(
        is_train=True,
        augmentations=[T.ResizeShortestEdge((40,), 1000, "choice")],
        tokenizer=str(tok_dir),
        category_names={"toy": ["red box", "blue box"]},
        control_prob=(0.0, 1.0, 0.0, 0.0),
        max_query_len=t_len,
    )
    annos = [{"bbox": [5, 5, 20, 10], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 1}]
    real = mapper(
        {"file_name": str(image), "height": 40, "width": 60, "image_id": 1, "task": "detection",
         "dataset_name": "toy", "annotations": annos}
    )  # fmt: skip
    for rec in batch:
        for key in ("image", "input_ids", "attention_mask", "label_token_map"):
            assert rec[key].dtype == real[key].dtype and rec[key].dim() == real[key].dim(), key
        assert rec["image"].shape == (3, 40, 60) and rec["input_ids"].shape == (t_len,)
        inst, ref = rec["instances"], real["instances"]
        assert set(inst.get_fields()) == set(ref.get_fields())
        for field in ("gt_classes", "gt_positive_map"):
            assert getattr(inst, field).dtype == getattr(ref, field).dtype, field
        assert inst.image_size == (40, 60) and len(inst) == 5
        boxes = inst.gt_boxes.tensor
        assert (boxes[:, 2:] > boxes[:, :2]).all()
        assert (boxes >= 0).all() and (boxes[:, 2] <= 60).all() and (boxes[:, 3] <= 40).all()
        # 12 labels x (2 words + separator) + <s> + </s> = 38 real tokens of 64
        assert rec["label_token_map"].shape == (12, t_len)
        assert int(rec["attention_mask"].sum()) == 38
        assert (rec["label_token_map"].sum(1) == 2).all()
        assert not (rec["label_token_map"] & (rec["attention_mask"] == 0)[None]).any()
        assert torch.equal(inst.gt_positive_map, rec["label_token_map"][inst.gt_classes])


def test_prompt_shrinks_to_fit_coco_sized_class_lists():
    cfg = load_config(
        FINE, ["MODEL.DYHEAD.NUM_CLASSES", "81", "MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN", "256"]
    )
    rec = detector_batch(cfg, 1, 32, 32, num_boxes=1)[0]
    assert rec["label_token_map"].shape[0] == 80  # all 80 COCO names fit: 1 + 80 * 3 + 1 = 242
    assert int(rec["attention_mask"].sum()) == 242
    cfg = load_config(FINE, ["MODEL.DYHEAD.NUM_CLASSES", "81"])  # T = 64: one word each, 31 fit
    rec = detector_batch(cfg, 1, 32, 32, num_boxes=1)[0]
    assert rec["label_token_map"].shape[0] == (64 - 2) // 2
    assert (rec["label_token_map"].sum(1) == 1).all()


def test_coarse_batch_matches_the_caption_mapper_contract(tmp_path):
    cfg = load_config(COARSE, [])
    t_len = cfg.MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN
    tok_dir = tmp_path / "tok"
    build_shapes_tokenizer(tok_dir)
    image = tmp_path / "im.png"
    Image.fromarray(np.full((40, 60, 3), 128, np.uint8)).save(image)
    real = CaptionDatasetMapper(
        is_train=True, image_size=32, tokenizer=str(tok_dir), max_query_len=t_len
    )({"file_name": str(image), "image_id": 1, "caption": "a red box"})
    train = coarse_batch(cfg, 3, 32, 32, train=True, seed=2)
    for rec in train:
        for key in ("image", "input_ids", "attention_mask", "mlm_input_ids", "mlm_labels"):
            assert rec[key].dtype == real[key].dtype and rec[key].shape == real[key].shape, key
        labels, ids = rec["mlm_labels"], rec["input_ids"]
        selected = labels != -100
        assert torch.equal(labels[selected], ids[selected])
        assert not (selected & (rec["attention_mask"] == 0)).any()  # padding is never masked
        assert torch.equal(rec["mlm_input_ids"][~selected], ids[~selected])
    assert sum(int((r["mlm_labels"] != -100).sum()) for r in train) > 0
    evaluation = coarse_batch(cfg, 2, 32, 32, train=False)
    assert evaluation[0]["input_ids"].shape == (5, t_len) and "mlm_labels" not in evaluation[0]


def test_peak_memory_sees_a_large_allocation():
    meter = PeakMemory(torch.device("cpu"))
    meter.start()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, every page touched
    assert block.sum() > 0
    peak = meter.peak_mb()
    del block
    assert 60.0 <= peak < 1024.0


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--config-file", FINE, "MODEL.SWIN.NOT_A_KEY", "1"], "MODEL.SWIN.NOT_A_KEY"),
        (["--config-file", "configs/nope.yaml"], "configs/nope.yaml"),
        (
            ["--config-file", COARSE, "--task", "train", "--batch", "1"]
            + ["MODEL.COARSE.ITM_NEGATIVES", "batch"],
            "--batch >= 2",
        ),
        (["--config-file", FINE, "--device", "cpu", "--amp-dtype", "fp16"], "fp16"),
        (["--config-file", FINE, "--iters", "0"], "--iters"),
        (["--config-file", FINE, "MODEL.WEIGHTS", "/no/such.pth"], "/no/such.pth"),
    ],
)
def test_bad_input_is_one_line(capsys, argv, needle):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--device", "cpu", *argv])
    message = exc.value.code
    assert isinstance(message, str) and message.startswith("error:") and needle in message
    assert "\n" not in message
    assert capsys.readouterr().out == ""  # no JSON line


def test_speed_targets_apply_only_to_reference_runs():
    def target(*extra, threads=1):
        torch.set_num_threads(threads)
        args = bench._parser().parse_args(["--config-file", FINE, "--device", "cpu", *extra])
        return bench._target(args)

    assert target("--task", "train") == bench.SPEED_TARGETS_MS[("fine_tiny.yaml", "train", 1)]
    others = (["--height", "64"], ["--amp"], ["--batch", "2"], ["MODEL.SEED", "1"])
    sides = (["--reference"], ["--variant", "reference"], ["--variant", "improved"])
    for extra in others + sides:
        assert target("--task", "train", *extra) is None, extra
    assert target("--task", "train", threads=2) is None  # two threads on a shared CPU: too noisy


@pytest.mark.long(0.7)
@pytest.mark.parametrize("task", ["lvis-eval", "train", "train-fwd-bwd", "backbone"])
def test_reference_prints_both_runs_and_their_ratio(monkeypatch, capsys, task):
    calls = []
    real_run = bench.subprocess.run

    def spy(cmd, **kwargs):
        calls.append(cmd)
        return real_run(cmd, **kwargs)

    monkeypatch.setattr(bench.subprocess, "run", spy)
    argv = ["--config-file", FINE, "--task", task, "--device", "cpu", "--iters", "1"]
    argv += ["--warmup", "0", "--height", "64", "--width", "96", "--threads", "1", "--reference"]
    argv += ["--names", "25", "--chunk", "10", "--boxes", "2", *SMALL]
    result = bench.main(argv)
    # each side in a fresh process, with the same arguments but the side
    assert [c[c.index("--variant") + 1] for c in calls] == ["reference", "improved"]
    assert all("--reference" not in c and c[-len(SMALL) :] == SMALL for c in calls)
    lines = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    assert [ln["variant"] for ln in lines] == ["reference", "improved", "ratio"]
    ref, new, ratio = lines
    assert result == {"reference": ref, "improved": new, "ratio": ratio}
    assert ratio["speedup"] == round(ref["ms_median"] / new["ms_median"], 3)
    assert ratio["peak_mem_ratio"] == round(new["peak_mem_mb"] / max(ref["peak_mem_mb"], 1e-9), 3)
    assert ratio["overrides"] == REFERENCE_OVERRIDES
    if task != "lvis-eval":  # the peak up to the end of the forward, compared on its own
        fwd = round(new["fwd_peak_mem_mb"] / max(ref["fwd_peak_mem_mb"], 1e-9), 3)
        assert ratio["fwd_peak_mem_ratio"] == fwd
    else:
        assert "fwd_peak_mem_ratio" not in ratio
    if task == "lvis-eval":
        assert ref["chunks"] == new["chunks"] == 3 and ref["names"] == 25
        assert ref["outputs"] == new["outputs"]  # the same detections either way


def test_reference_cfg_switches_every_feature_off():
    cfg = load_config(FINE, [])
    ref = reference_cfg(cfg)
    assert ref.INPUT.PAD_TO_MAX_QUERY_LEN and not ref.TEST.PREFIX_REUSE
    assert not ref.MODEL.DYHEAD.DFCONV_RECOMPUTE
    assert not ref.MODEL.LANGUAGE_BACKBONE.CHECKPOINT_CROSS_ATTENTION
    defaults = add_fiber_config(get_cfg())  # the package defaults: features on
    assert not defaults.INPUT.PAD_TO_MAX_QUERY_LEN and defaults.TEST.PREFIX_REUSE
    assert defaults.MODEL.DYHEAD.DFCONV_RECOMPUTE
    assert defaults.MODEL.LANGUAGE_BACKBONE.CHECKPOINT_CROSS_ATTENTION


def test_chunked_prompts_follow_the_lvis_chunking():
    cfg = load_config(FINE, [])
    ids, mask, maps = chunked_prompts(cfg, 25, 10, torch.Generator().manual_seed(0))
    t = cfg.MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN
    assert ids.shape == (3, t) and maps.shape == (3, 10, t)
    assert maps.sum(dim=(1, 2)).tolist() == [20, 20, 10]  # two tokens per name
    assert mask.sum(dim=1).tolist() == [32, 32, 17]  # <s> 3 per name </s> (the last "." kept)
    assert not (maps & (mask[:, None, :] == 0)).any()


def test_perf_quiet_script_runs_valid_benchmark_commands(tmp_path):
    """tools/perf_quiet.sh, with a stand-in interpreter that records its arguments: every row is a
    command line the benchmark accepts, one per README row with a time figure."""
    import subprocess

    log = tmp_path / "argv.txt"
    fake = tmp_path / "fake_python"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    fake.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(fake)}
    subprocess.run(["bash", str(ROOT / "tools" / "perf_quiet.sh")], env=env, check=True)
    rows = [line.split() for line in log.read_text().splitlines()]
    tasks = []
    for argv in rows:
        assert argv[0] == "tools/benchmark.py"
        args = bench._parser().parse_args(argv[1:])
        assert args.reference and args.threads == 1 and args.iters == 1 and args.warmup == 0
        assert Path(ROOT / args.config_file).is_file()
        tasks.append((args.task, args.height, args.width))
    assert tasks == [
        ("train-fwd-bwd", None, None),
        ("train-fwd-bwd", 512, 512),
        ("inference", None, None),
        ("inference", 512, 512),
        ("lvis-eval", None, None),
    ]


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--config-file", FINE], "--task caption needs a coarse-stage config"),
        (["--config-file", COARSE, "--height", "64"], "instead of --height / --width"),
    ],
)
def test_caption_task_refuses_what_it_would_ignore(extra, needle):
    """The caption task measured a captioning model built from a detector config, and at the
    config's square size whatever --height / --width said, without a word."""
    with pytest.raises(SystemExit) as exc:
        bench.main(["--task", "caption", "--device", "cpu", *extra])
    message = str(exc.value.code)
    assert message.startswith("error:") and needle in message and "\n" not in message


def test_caption_task_without_the_projects_is_one_line(monkeypatch, tmp_path):
    """In a wheel install (no projects/ folder) the caption task ended in a bare
    "No module named 'captioning'"."""
    from fiber_d2.benchmark import tasks

    monkeypatch.setattr(tasks, "_CAPTION_PROJECT", str(tmp_path / "projects" / "Captioning"))
    with pytest.raises(SystemExit) as exc:
        bench.main(["--task", "caption", "--device", "cpu", "--config-file", COARSE])
    assert str(exc.value.code).startswith("error: --task caption runs projects/Captioning, which ")
    assert "ships with the source checkout" in str(exc.value.code)


def test_out_of_memory_is_one_line():
    """A batch that cannot be allocated ended in the allocator's RuntimeError traceback."""
    side = str(10**7)  # more than a 47-bit address space, on any machine
    argv = ["--config-file", FINE, "--task", "inference", "--device", "cpu", "--iters", "1"]
    argv += ["--warmup", "0", "--height", side, "--width", side, "--threads", "1", *SMALL]
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    message = exc.value.code
    assert isinstance(message, str) and "\n" not in message
    assert message.startswith("error: --task inference at batch 1: out of memory:")
