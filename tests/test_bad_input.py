"""Bad input through training, evaluation and prediction: each case ends in a named one-line error
or a counted warning, and no earlier file of an existing OUTPUT_DIR changes.

Each test is one row of the bad-input table (input x path -> behaviour); run
``.venv/bin/python -m pytest -q tests/test_bad_input.py -v`` to reproduce it. Paths: "train" and
"eval" are ``tools/train_net.py`` (``--eval-only``), in a subprocess where the exact stderr matters
(pickle payload) and in-process otherwise; "predict" is ``FIBERPredictor`` / ``tools/demo.py``;
the dataset-level cases go through the loaders, ``GroundingDatasetMapper`` and the evaluators.
"""

import builtins
import hashlib
import json
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_argument_parser
from PIL import Image
from tool_scripts import load_tool

import fiber_d2  # noqa: F401
from fiber_d2.checkpoint import CheckpointError
from fiber_d2.data.datasets import register_grounding_coco, register_mdetr_grounding
from fiber_d2.data.datasets.common import IMAGE_READ_ERRORS, BadRecordError
from fiber_d2.data.mapper import GroundingDatasetMapper
from fiber_d2.engine.cli import check_before_run
from fiber_d2.engine.setup import ConfigError, load_config, validate_config
from fiber_d2.predictor import FIBERPredictor

ROOT = Path(__file__).resolve().parents[1]
FINE = str(ROOT / "configs/Demo/fine_tiny.yaml")
RETRIEVAL = str(ROOT / "projects/Retrieval/configs/shapes_itc.yaml")
TINY = [
    "MODEL.SWIN.DEPTHS", "[2, 2, 2, 2]",
    "MODEL.FIBER.NUM_FUSION_LAYERS", "2",
    "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "96",
    "SOLVER.MAX_ITER", "1",
    "SOLVER.WARMUP_ITERS", "1",
    "SOLVER.IMS_PER_BATCH", "2",
]  # fmt: skip
train_net = load_tool("train_net")
demo = load_tool("demo")
converter = load_tool("convert_fiber_checkpoint")


# ----------------------------------------------------------------------------- helpers
def snapshot(folder: Path) -> dict:
    """{relative path: sha256} of every file under ``folder``."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def register_coco_file(name: str, json_file: Path, data: dict | None = None) -> None:
    """Register (afresh) the COCO-format set ``name`` of ``json_file``, written from ``data`` when
    given; its images are read beside the file."""
    if data is not None:
        json_file.write_text(json.dumps(data))
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_grounding_coco(name, str(json_file), str(json_file.parent))


@pytest.fixture()
def out(tmp_path):
    """An existing OUTPUT_DIR holding the files of an earlier run."""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "results.json").write_text('{"bbox": {"AP": 12.5}}')
    (folder / "config.yaml").write_text("OUTPUT_DIR: earlier\n")
    (folder / "log.txt").write_text("earlier log\n")
    (folder / "metrics.json").write_text('{"iteration": 9}\n')
    (folder / "model_final.pth").write_bytes(b"earlier weights")
    return folder


def one_line_error(message) -> str:
    text = str(message)
    assert "\n" not in text.strip() and "Traceback" not in text, text
    return text


def run_cli(script: str, args: list, extra_path: str = "") -> str:
    """Run a command-line tool in a subprocess; returns its one ``error:`` line."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), extra_path) if p)
    proc = subprocess.run(
        [sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, env=env
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:"), proc.stderr[-3000:]
    return last


def run_train_net(args: list) -> str:
    """``tools/train_net.py`` in-process (one process: ``launch`` calls ``main`` directly)."""
    parsed = default_argument_parser().parse_args(args)
    with pytest.raises(SystemExit) as err:
        train_net.main(parsed)
    line = one_line_error(err.value.code)
    assert line.startswith("error:")
    return line


def run_demo(args: list) -> str:
    with pytest.raises(SystemExit) as err:
        demo.main(args)
    line = one_line_error(err.value.code)
    assert line.startswith("error:")
    return line


def error_line(path: str, opts: list, out: Path, tmp_path: Path, error=Exception) -> str:
    """The one error line of the tiny detector config plus ``opts`` through one path: "train" /
    "eval" (``tools/train_net.py`` with ``OUTPUT_DIR`` = ``out``), "predict" (``FIBERPredictor``,
    raising ``error``) or "demo" (``tools/demo.py`` on one blank image)."""
    if path in ("train", "eval"):
        flags = ["--eval-only"] if path == "eval" else []
        return run_train_net(["--config-file", FINE, *flags, "OUTPUT_DIR", str(out), *TINY, *opts])
    if path == "predict":
        with pytest.raises(error) as err:
            FIBERPredictor(load_config(FINE, [*TINY, *opts]))
        return one_line_error(err.value)
    image = tmp_path / "img.png"
    Image.new("RGB", (32, 32)).save(image)
    return run_demo(["--input", str(image), "--prompt", "red circle", "--opts", *TINY, *opts])


class _Payload:
    """Unpickling it creates ``path`` (an attacker's side effect)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (builtins.open, (self.path, "w"))


def write_payload(path: Path, marker: Path) -> str:
    obj = {"model": {"backbone.w": _Payload(marker)}, "__author__": "someone"}
    if path.suffix == ".pkl":
        with open(path, "wb") as f:
            pickle.dump(obj, f)
    else:
        torch.save(obj, path)
    return str(path)


# ----------------------------------------------------------------------------- pickle payload
PAYLOAD_PATHS = [
    "train_net train",
    "train_net --eval-only",
    "train_net --resume",
    "FIBERPredictor",
    "tools/demo.py",
    "convert_fiber_checkpoint",
    "Retrieval train_net",
]


# (path, suffix): every path with a .pkl payload and a pickled .pth one (the Retrieval entry point,
# a 20 s subprocess, reads .pth through the same loader as train_net: .pkl only).
PAYLOAD_CASES = [
    (p, s)
    for p in PAYLOAD_PATHS
    for s in (".pkl", ".pth")
    if (p, s) != ("Retrieval train_net", ".pth")
]


@pytest.mark.parametrize("path,suffix", PAYLOAD_CASES)
def test_pickle_payload_never_runs(path, suffix, out, tmp_path):
    marker = tmp_path / "PAYLOAD_RAN"
    evil = write_payload(tmp_path / f"evil{suffix}", marker)
    before = snapshot(out)
    common = ["OUTPUT_DIR", str(out), *TINY]
    if path == "train_net train" and suffix == ".pkl":  # the real process: stderr is one line
        line = run_cli(
            "tools/train_net.py", ["--config-file", FINE, "MODEL.WEIGHTS", evil, *common]
        )
    elif path == "train_net train":
        line = run_train_net(["--config-file", FINE, "MODEL.WEIGHTS", evil, *common])
    elif path == "train_net --eval-only":
        line = run_train_net(["--config-file", FINE, "--eval-only", "MODEL.WEIGHTS", evil, *common])
    elif path == "train_net --resume":
        inside = write_payload(out / f"model_0000099{suffix}", marker)
        (out / "last_checkpoint").write_text(Path(inside).name)
        before = snapshot(out)
        line = run_train_net(["--config-file", FINE, "--resume", *common])
        evil = inside
    elif path == "FIBERPredictor":
        with pytest.raises(CheckpointError) as err:
            FIBERPredictor(load_config(FINE, [*TINY, "MODEL.WEIGHTS", evil]))
        line = one_line_error(err.value)
    elif path == "tools/demo.py":
        image = tmp_path / "img.png"
        Image.new("RGB", (32, 32)).save(image)
        line = run_demo(
            [
                "--input",
                str(image),
                "--prompt",
                "red circle",
                "--opts",
                *TINY,
                "MODEL.WEIGHTS",
                evil,
            ]
        )
    elif path == "convert_fiber_checkpoint":
        target = tmp_path / "converted.pth"
        with pytest.raises(SystemExit) as err:
            converter.main(["--input", evil, "--output", str(target)])
        line = one_line_error(err.value.code)
        assert not target.exists()
    else:  # the project's entry point, in its own process
        line = run_cli(
            "projects/Retrieval/train_net.py",
            ["--config-file", RETRIEVAL, "MODEL.WEIGHTS", evil, "OUTPUT_DIR", str(out)],
            extra_path=str(ROOT / "projects/Retrieval"),
        )
    assert not marker.exists(), f"{path}: the payload ran"
    assert evil in line and "refusing to load" in line
    assert "io.open" in line or "builtins.open" in line  # names what was refused
    assert snapshot(out) == before


# ----------------------------------------------------------------------------- checkpoints
@pytest.fixture()
def other_arch(tmp_path):
    """A checkpoint of another architecture (a ResNet-like state dict)."""
    path = tmp_path / "resnet.pth"
    torch.save(
        {"model": {"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}},
        path,
    )
    return str(path)


@pytest.mark.parametrize("path", ["train", "eval", "predict", "demo"])
def test_checkpoint_of_another_architecture(path, other_arch, out, tmp_path):
    before = snapshot(out)
    line = error_line(path, ["MODEL.WEIGHTS", other_arch], out, tmp_path, CheckpointError)
    assert other_arch in line and "another architecture" in line
    assert "backbone.bottom_up" in line and "MODEL.WEIGHTS_PARTIAL_OK" in line  # missing groups
    assert snapshot(out) == before


@pytest.fixture()
def coarse_checkpoint(tmp_path):
    """A coarse-stage checkpoint of the tiny model: the towers, no FPN or detector head."""
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    model = build_model(load_config(str(ROOT / "configs/Demo/coarse_tiny.yaml"), TINY))
    path = tmp_path / "coarse_final.pth"
    torch.save({"model": model.state_dict()}, path)
    return str(path)


@pytest.mark.parametrize("path", ["eval", "predict", "demo"])
def test_coarse_checkpoint_is_not_evaluated_as_a_detector(path, coarse_checkpoint, out, tmp_path):
    """Training the fine stage from it is the coarse-to-fine hand-off (the head is the stage's
    own); evaluating or predicting with it would score an untrained head: one line instead."""
    before = snapshot(out)
    line = error_line(path, ["MODEL.WEIGHTS", coarse_checkpoint], out, tmp_path, CheckpointError)
    assert coarse_checkpoint in line and "no detector head" in line
    assert "backbone.fpn_lateral3" in line and "MODEL.WEIGHTS_PARTIAL_OK" in line
    assert snapshot(out) == before


def test_partial_checkpoint_loads_when_allowed(other_arch, caplog):
    with caplog.at_level(logging.WARNING, logger="fiber_d2.checkpoint.checkpointer"):
        FIBERPredictor(
            load_config(
                FINE, [*TINY, "MODEL.WEIGHTS", other_arch, "MODEL.WEIGHTS_PARTIAL_OK", "True"]
            )
        )
    assert "loading anyway (MODEL.WEIGHTS_PARTIAL_OK)" in caplog.text


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("path", ["train", "eval", "predict", "demo"])
def test_unknown_config_key(path, out, tmp_path):
    before = snapshot(out)
    line = error_line(path, ["MODEL.SWIN.NOT_A_KEY", "1"], out, tmp_path, ConfigError)
    assert "MODEL.SWIN.NOT_A_KEY" in line
    assert snapshot(out) == before


@pytest.mark.parametrize("eval_only", [False, True])
def test_output_dir_that_cannot_be_written(eval_only, tmp_path):
    """Was a traceback from detectron2's logger setup (NotADirectoryError / FileNotFoundError)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    # an evaluation of untrained weights must be asked for (below)
    flags = ["--eval-only", "MODEL.WEIGHTS_PARTIAL_OK", "True"] if eval_only else []
    line = run_train_net(["--config-file", FINE, *flags, *TINY, "OUTPUT_DIR", str(blocker / "out")])
    expected = (
        f"error: OUTPUT_DIR {blocker / 'out'} cannot be written: {blocker} is a file, not a folder"
    )
    assert line == expected


def test_a_coarse_image_size_the_image_tower_cannot_take(out):
    """INPUT.IMAGE_SIZE 100 failed in the first forward pass with advice about SIZE_DIVISIBILITY,
    which the coarse stage does not read."""
    coarse = str(ROOT / "configs" / "Demo" / "coarse_tiny.yaml")
    before = snapshot(out)
    line = run_train_net(
        ["--config-file", coarse, "OUTPUT_DIR", str(out), "INPUT.IMAGE_SIZE", "100"]
    )
    assert line.startswith("error: INPUT.IMAGE_SIZE 100 must be a positive multiple of 32")
    assert snapshot(out) == before


def test_a_coarse_stage_whose_mlm_masks_nothing(out):
    """MODEL.COARSE.MLM_PROBABILITY 0 with the 'mlm' objective on was a KeyError
    ('mlm_input_ids') at the first step; without that objective it trains."""
    coarse = str(ROOT / "configs" / "Demo" / "coarse_tiny.yaml")
    before = snapshot(out)
    line = run_train_net(
        ["--config-file", coarse, "OUTPUT_DIR", str(out), "MODEL.COARSE.MLM_PROBABILITY", "0.0"]
    )
    assert line.startswith("error: MODEL.COARSE.MLM_PROBABILITY 0.0 masks no token for the 'mlm'")
    assert snapshot(out) == before
    without_mlm = [
        "MODEL.COARSE.MLM_PROBABILITY", "0.0",
        "MODEL.COARSE.LOSSES", "['itc', 'itm']",
        "MODEL.COARSE.LOSS_WEIGHTS", "[1.0, 1.0]",
    ]  # fmt: skip
    validate_config(load_config(coarse, without_mlm), training=True)


def test_prompt_and_image_cache_settings_are_one_line(out):
    """A malformed DATASETS.CAPTION_PROMPT, INPUT.VL_CACHE_IMAGES with a random training transform,
    and DATASETS.CAPTION_PROMPT with a shuffled training prompt or beside DATASETS.TEST_PROMPT: the
    mappers find the last three, which were one line only after the run had written config.yaml and
    its log. All are refused before anything is written."""
    before = snapshot(out)
    line = run_train_net(
        ["--config-file", FINE, "OUTPUT_DIR", str(out), *TINY, "DATASETS.CAPTION_PROMPT", "[{"]
    )
    assert line.startswith("error: DATASETS.CAPTION_PROMPT is not a list literal")
    assert snapshot(out) == before
    coarse = str(ROOT / "configs" / "Demo" / "coarse_tiny.yaml")
    line = run_train_net(
        ["--config-file", coarse, "OUTPUT_DIR", str(out), "INPUT.VL_CACHE_IMAGES", "True",
         "INPUT.VL_TRAIN_TRANSFORM", "albef_randaug"]
    )  # fmt: skip
    assert line.startswith("error: INPUT.VL_CACHE_IMAGES needs INPUT.CAPTION_FLIP_PROB 0")
    assert snapshot(out) == before
    both_prompts = [
        "DATASETS.CAPTION_PROMPT", repr(str([{"prefix": "", "name": "a", "suffix": ""}])),
        "DATASETS.TEST_PROMPT", "['a']",
    ]  # fmt: skip
    line = run_train_net(["--config-file", FINE, "OUTPUT_DIR", str(out), *TINY, *both_prompts])
    assert line.startswith("error: DATASETS.CAPTION_PROMPT in training needs DATASETS.FULL_PROMPT")
    assert snapshot(out) == before
    in_label_order = ["DATASETS.FULL_PROMPT_TRAIN", "True", "DATASETS.DISABLE_SHUFFLE", "True"]
    line = run_train_net(
        ["--config-file", FINE, "OUTPUT_DIR", str(out), *TINY, *both_prompts, *in_label_order]
    )  # the test sets' mapper
    assert line == "error: set DATASETS.CAPTION_PROMPT or DATASETS.TEST_PROMPT, not both"
    assert snapshot(out) == before


def test_a_repository_base_resolves_at_every_level(tmp_path):
    """``_BASE_: "configs/Demo/fine_tiny.yaml"`` worked only in the file given; a yaml based on that
    yaml failed with "cannot read configs/Demo/fine_tiny.yaml", naming neither file that asked."""
    (tmp_path / "a.yaml").write_text(
        '_BASE_: "configs/Demo/fine_tiny.yaml"\nSOLVER:\n  MAX_ITER: 7\n'
    )
    (tmp_path / "b.yaml").write_text('_BASE_: "a.yaml"\nSOLVER:\n  BASE_LR: 0.5\n')
    cfg = load_config(str(tmp_path / "b.yaml"))
    reference = load_config(FINE, ["SOLVER.MAX_ITER", "7", "SOLVER.BASE_LR", "0.5"])
    assert cfg.dump() == reference.dump()
    (tmp_path / "a.yaml").write_text('_BASE_: "configs/Demo/no_such.yaml"\n')
    with pytest.raises(ConfigError, match=r"b.yaml: cannot read configs/Demo/no_such.yaml \(the "
                       r"_BASE_ of .*a.yaml\): No such file"):  # fmt: skip
        load_config(str(tmp_path / "b.yaml"))


def test_eval_only_without_weights(out):
    """Was an evaluation of a randomly initialised model, written to results.json with exit 0."""
    before = snapshot(out)
    line = run_train_net(["--config-file", FINE, "--eval-only", *TINY, "OUTPUT_DIR", str(out)])
    assert line.startswith("error: --eval-only without weights") and "MODEL.WEIGHTS" in line
    assert snapshot(out) == before


@pytest.mark.parametrize(
    "text, message",
    [
        ("MODEL:\n  DEVICE: [cpu\n", "not valid YAML: expected ',' or ']'"),
        ("SOLVER:\n  MAX_ITER: abc\n", "Type mismatch"),
        ("_BASE_: missing.yaml\n", "cannot read missing.yaml (the _BASE_ of "),
        ("_BASE_: [a.yaml]\n", "_BASE_ must be a yaml file name, got ['a.yaml']"),
        ("_BASE_: mine.yaml\n", "_BASE_ cycle: "),
        ("- a\n- b\n", "the top level is keys (KEY: value lines), not list"),
        ("MODEL: 3\n", "MODEL is a section of keys (KEY: value lines), not int 3"),
        ("MODEL:\n  SWIN: 4\n", "MODEL.SWIN is a section of keys"),
    ],
)
def test_malformed_config_file(text, message, out, tmp_path):
    """Each ended in a yaml / detectron2 traceback; now one line naming the file (and the key)."""
    user = tmp_path / "mine.yaml"
    user.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(str(user))
    assert str(err.value).startswith(f"{user}: ") and message in str(err.value)
    assert "\n" not in str(err.value)
    if "DEVICE" in text:  # and through the command line, before anything is written
        before = snapshot(out)
        line = run_train_net(["--config-file", str(user), "OUTPUT_DIR", str(out)])
        assert line.startswith(f"error: {user}: not valid YAML")
        assert snapshot(out) == before


@pytest.mark.parametrize(
    "override, message",
    [
        (["SOLVER.IMS_PER_BATCH", "0"], "SOLVER.IMS_PER_BATCH 0 must be a positive multiple"),
        (["INPUT.MIN_SIZE_TRAIN", "()"], "INPUT.MIN_SIZE_TRAIN is empty"),
        (["MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN", "0"], "MAX_QUERY_LEN 0 must be between 3"),
        (["MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN", "2"], "MAX_QUERY_LEN 2 must be between 3"),
        (["MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN", "100"], "MAX_POSITION_EMBEDDINGS - 2 = 64"),
        (["MODEL.FIBER.NUM_FUSION_LAYERS", "9"], "NUM_FUSION_LAYERS 9 is more than the text"),
        (["MODEL.DEVICE", "cuda"], "MODEL.DEVICE cuda: no CUDA device is available here"),
        (["MODEL.DEVICE", "cuda:0"], "MODEL.DEVICE cuda:0: no CUDA device is available here"),
        # settings that failed in detectron2, torch or transformers once the run had started
        (["SOLVER.CHECKPOINT_PERIOD", "0"], "SOLVER.CHECKPOINT_PERIOD 0 must be at least 1"),
        (["SOLVER.STEPS", "(4, 2)"], "SOLVER.STEPS (4, 2) must be increasing iterations"),
        (["SOLVER.STEPS", "(2, 2)"], "SOLVER.STEPS (2, 2) must be increasing iterations"),
        (["SOLVER.BASE_LR", "-1.0"], "SOLVER.BASE_LR -1.0 must be >= 0"),
        (["DATALOADER.NUM_WORKERS", "-1"], "DATALOADER.NUM_WORKERS -1 must be >= 0"),
        (["CPU_MMAP_THRESHOLD_MB", "64"], "CPU_MMAP_THRESHOLD_MB must be between 0"),
        (["MODEL.META_ARCHITECTURE", "Foo"], "MODEL.META_ARCHITECTURE 'Foo' is not registered"),
        (["MODEL.DEVICE", "foo"], "MODEL.DEVICE foo: not a torch device"),
        (["INPUT.MIN_SIZE_TRAIN", "(-10,)"], "INPUT.MIN_SIZE_TRAIN (-10,)"),
        (["INPUT.MIN_SIZE_TEST", "-1"], "INPUT.MIN_SIZE_TEST -1: training sizes must be >= 1, the"),
        (["MODEL.LANGUAGE_BACKBONE.TOKENIZER", "/nonexistent/tokenizer"], "TOKENIZER: cannot load"),
        # choices and ranges, refused by the build of the model, the optimizer or a batch (a
        # traceback, some after a whole training run), or silently accepted
        (["MODEL.DYHEAD.SCORE_AGG", "max"], "MODEL.DYHEAD.SCORE_AGG must be one of MEAN, MAX; got"),
        (["INPUT.MIN_SIZE_TRAIN_SAMPLING", "random"], "MIN_SIZE_TRAIN_SAMPLING must be one of"),
        (["SOLVER.OPTIMIZER", "ADAM"], "SOLVER.OPTIMIZER must be one of ADAMW, SGD; got 'ADAM'"),
        (["SOLVER.PARAM_GROUP_RULE", "medium"], "SOLVER.PARAM_GROUP_RULE must be one of"),
        (["SOLVER.LR_SCHEDULER_NAME", "Cosine"], "SOLVER.LR_SCHEDULER_NAME must be one of"),
        (["SOLVER.WARMUP_METHOD", "cosine"], "SOLVER.WARMUP_METHOD must be one of linear"),
        (["INPUT.FORMAT", "rgb"], "INPUT.FORMAT must be one of BGR, RGB; got 'rgb'"),
        (["SOLVER.BETAS", "(0.9,)"], "SOLVER.BETAS must be two values in [0, 1)"),
        (["SOLVER.BETAS", "(0.9, 1.0)"], "SOLVER.BETAS must be two values in [0, 1)"),
        (["SOLVER.EMA.DECAY", "1.5"], "SOLVER.EMA.DECAY must be between 0 and 1, got 1.5"),
        (["INPUT.FLIP_PROB", "1.5"], "INPUT.FLIP_PROB must be between 0 and 1"),
        (["MODEL.ATSS.NMS_TH", "1.5"], "MODEL.ATSS.NMS_TH must be between 0 and 1"),
        (["MODEL.DYHEAD.TOKEN_ALPHA", "2.0"], "TOKEN_ALPHA must be between 0 and 1 (or -1)"),
        (["MODEL.COARSE.MLM_PROBABILITY", "1.5"], "MLM_PROBABILITY must be between 0 and 1"),
        (["INPUT.MAX_SIZE_TEST", "0"], "INPUT.MAX_SIZE_TEST 0 must be a positive size"),
        (["DATASETS.CONTROL_PROB", "(0.5, 0.5)"], "CONTROL_PROB must be 4 probabilities"),
        (["DATASETS.CONTROL_PROB", "(0.5, 0.5, 0.5, 0.0)"], "summing to at most 1"),
        (
            ["DATASETS.CONTROL_PROB", "(-0.5, 0.5, 0.5, 0.0)"],
            "CONTROL_PROB must be 4 probabilities",
        ),
        # one image per pass: the batch standardisation of cls_feats divides by a zero spread
        (
            ["MODEL.COARSE.CLS_BATCH_NORM", "True", "SOLVER.IMS_PER_BATCH", "1"],
            "it needs at least 2 per pass",
        ),
        (["DATASETS.RANDOM_SAMPLE_NEG", "-1"], "DATASETS.RANDOM_SAMPLE_NEG -1 must be >= 0"),
        (["TEST.AMP_DTYPE", "fp16"], "TEST.AMP_DTYPE must be one of bfloat16, float16"),
        (["TEST.FLICKR_GT_TYPE", "merge"], "TEST.FLICKR_GT_TYPE must be one of separate, merged"),
        (["SOLVER.MAX_NEG_PER_BATCH", "2.0"], "SOLVER.MAX_NEG_PER_BATCH must be between 0 and 1"),
        (["SOLVER.WEIGHT_DECAY_SCHEDULE_RATIO", "2.0"], "SCHEDULE_RATIO must be between 0 and 1"),
        (["DATASETS.SEPARATION_TOKENS", "''"], "DATASETS.SEPARATION_TOKENS is empty"),
        (["MODEL.WEIGHTS", "/nonexistent/w.pth"], "MODEL.WEIGHTS file not found: /nonexistent/w"),
        (["MODEL.SWIN.WEIGHTS", "/no/swin.pth"], "MODEL.SWIN.WEIGHTS file not found: /no/swin.pth"),
        (
            ["MODEL.LANGUAGE_BACKBONE.WEIGHTS", "/no/roberta",
             "MODEL.LANGUAGE_BACKBONE.POSITION_INIT_SCALE", "1.0",
             "MODEL.LANGUAGE_BACKBONE.INITIALIZER_RANGE", "0.02"],
            "MODEL.LANGUAGE_BACKBONE.WEIGHTS '/no/roberta': no such directory",
        ),  # fmt: skip
        (["SOLVER.MAX_ITER", "ten"], "command-line override: "),
        (["SOLVER.NO_SUCH_KEY", "1"], "command-line override: "),
        (["TEST.CHUNK_BATCH_SIZE", "0"], "TEST.CHUNK_BATCH_SIZE must be >= 1, got 0"),
        (["MODEL.DYHEAD.NUM_CONVS", "-1"], "MODEL.DYHEAD.NUM_CONVS -1 must be at least 0"),
        (["MODEL.COARSE.QUEUE_SIZE", "0"], "MODEL.COARSE.QUEUE_SIZE 0 must be at least 1"),
        (["MODEL.COARSE.TEMPERATURE", "0.0"], "MODEL.COARSE.TEMPERATURE 0.0 must be in (0, 1]"),
        (["MODEL.COARSE.ITC_TEXT_POOL", "cls"], "ITC_TEXT_POOL must be one of first, mean; got"),
        (["MODEL.DYHEAD.NUM_CLASSES", "1"], "MODEL.DYHEAD.NUM_CLASSES 1 must be at least 2"),
        (["MODEL.FPN.OUT_CHANNELS", "0"], "MODEL.FPN.OUT_CHANNELS 0 must be at least 1"),
        (["MODEL.ATSS.TOPK", "0"], "MODEL.ATSS.TOPK 0 must be at least 1"),
        (["TEST.DETECTIONS_PER_IMAGE", "0"], "TEST.DETECTIONS_PER_IMAGE 0 must be at least 1"),
        (
            ["MODEL.FPN.IN_FEATURES", "['res3', 'res4', 'res9']"],
            "MODEL.FPN.IN_FEATURES ['res9'] are not outputs of the image tower",
        ),
        (
            ["MODEL.SWIN.OUT_FEATURES", "['res4', 'res5']"],
            "MODEL.FPN.IN_FEATURES ['res3'] are not outputs of the image tower (MODEL.SWIN.OUT_",
        ),
        (["MODEL.COARSE.QUEUE_INIT", "zero"], "QUEUE_INIT must be one of random, empty; got"),
        (["MODEL.COARSE.ITM_NEGATIVES", "pool"], "ITM_NEGATIVES must be one of queue, batch; got"),
        (["INPUT.VL_TRAIN_TRANSFORM", "crop"], "VL_TRAIN_TRANSFORM must be one of resize, albef_"),
        (
            ["MODEL.COARSE.LOSSES", '["itc", "itn"]', "MODEL.COARSE.LOSS_WEIGHTS", "[1.0, 1.0]"],
            "MODEL.COARSE.LOSSES has unknown objectives ['itn']; known: itc, itm, mlm",
        ),
        (["MODEL.COARSE.LOSS_WEIGHTS", "[1.0]"], "LOSS_WEIGHTS [1.0] must give one weight per"),
        # sizes the model's build refused with a traceback (some without naming the key)
        (["MODEL.FIBER.NUM_FUSION_LAYERS", "-1"], "MODEL.FIBER.NUM_FUSION_LAYERS -1 must be >= 0"),
        (["MODEL.SWIN.WINDOW_SIZE", "0"], "MODEL.SWIN.WINDOW_SIZE 0 must be at least 1"),
        (["MODEL.SWIN.PATCH_SIZE", "0"], "MODEL.SWIN.PATCH_SIZE 0 must be at least 1"),
        (["MODEL.SWIN.OUT_FEATURES", "['res6']"], "OUT_FEATURES ['res6'] are not stage outputs"),
        (["MODEL.SWIN.OUT_NORM", "[True]"], "need one value per stage of DEPTHS"),
        (["MODEL.SWIN.NUM_HEADS", "[3, 8, 16, 32]"], "MODEL.SWIN.NUM_HEADS[0] 3 must divide"),
        (["MODEL.LANGUAGE_BACKBONE.NUM_HEADS", "5"], "must be a positive multiple of NUM_HEADS 5"),
        (["MODEL.DYHEAD.CHANNELS", "0"], "MODEL.DYHEAD.CHANNELS 0 must be a positive multiple"),
        (["MODEL.DYHEAD.NUM_GROUPS", "7"], "multiple of NUM_GROUPS 7 (GroupNorm)"),
        (["MODEL.PIXEL_MEAN", "[1.0, 2.0]"], "PIXEL_MEAN must have 3 values, one per channel of"),
        (["MODEL.ATSS.ANCHOR_SIZES", "[64]"], "need one value per FPN level: 5"),
        # anchors at other strides than the FPN levels' were placed off the features, silently
        (
            ["MODEL.ATSS.ANCHOR_STRIDES", "[4, 8, 16, 32, 64]"],
            "ANCHOR_STRIDES [4, 8, 16, 32, 64] must be the strides of the FPN levels, finest first: "
            "[8, 16, 32, 64, 128]",
        ),
    ],
)
def test_sizes_and_devices_the_run_cannot_have(override, message, out):
    """Each was an assertion, a shape error, a driver error from deep inside the first step, or a
    traceback after config.yaml and log.txt were written; now one line naming the key."""
    if (
        override[0] == "MODEL.DEVICE"
        and override[1].startswith("cuda")
        and torch.cuda.is_available()
    ):
        pytest.skip("a CUDA device is available here")
    before = snapshot(out)
    line = run_train_net(["--config-file", FINE, "OUTPUT_DIR", str(out), *TINY, *override])
    assert message in line
    assert snapshot(out) == before


@pytest.mark.parametrize(
    "override",
    [
        ["MODEL.SWIN.DEPTHS", "[2, 2, 2, 2]", "MODEL.FIBER.NUM_FUSION_LAYERS", "{text_layers}"],
        ["SOLVER.OPTIMIZER", "adamw"],  # any case
        ["MODEL.DYHEAD.TOKEN_ALPHA", "-1.0"],  # torchvision's focal loss without the weighting
        ["INPUT.MIN_SIZE_TEST", "0"],  # test images at their own size
        ["MODEL.DYHEAD.NUM_CONVS", "0"],  # a head without DyHead blocks
    ],
)
def test_values_the_run_can_have_are_accepted(override):
    """The edges of the pre-run checks: values the towers, the optimizer, the loss and the test
    resize take must not be refused."""
    text_layers = load_config(FINE, TINY).MODEL.LANGUAGE_BACKBONE.NUM_LAYERS
    override = [v.format(text_layers=text_layers) for v in override]
    validate_config(load_config(FINE, [*TINY, *override]), training=True)


def test_image_text_models_skip_the_detector_checks():
    """A model built on the coarse one (as VQA, NLVR2 and captioning are) has no FPN, head or
    anchors: a tower with only res5 and a head setting it never reads are not refused for it, but
    are for the detector."""
    from detectron2.modeling import META_ARCH_REGISTRY

    from fiber_d2.modeling.meta_arch import FIBERCoarse

    name = "ImageTextTaskForChecks"
    if name not in META_ARCH_REGISTRY:
        META_ARCH_REGISTRY.register(type(name, (FIBERCoarse,), {}))
    coarse = str(ROOT / "configs" / "Demo" / "coarse_tiny.yaml")
    unused = ["MODEL.SWIN.OUT_FEATURES", "['res5']", "MODEL.ATSS.TOPK", "0"]
    validate_config(load_config(coarse, ["MODEL.META_ARCHITECTURE", name, *unused]), training=False)
    with pytest.raises(ConfigError, match="MODEL.ATSS.TOPK 0 must be at least 1"):
        validate_config(load_config(FINE, [*TINY, *unused]), training=False)


def test_a_batch_the_processes_cannot_share(monkeypatch):
    """SOLVER.IMS_PER_BATCH is the batch of all processes together: each takes an equal share."""
    from detectron2.utils import comm

    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    cfg = load_config(FINE, [*TINY, "SOLVER.IMS_PER_BATCH", "3"])
    with pytest.raises(ConfigError, match=r"IMS_PER_BATCH 3 must be a positive multiple .* \(2\)"):
        validate_config(cfg, training=True)
    validate_config(load_config(FINE, [*TINY, "SOLVER.IMS_PER_BATCH", "4"]), training=True)


def test_amp_on_the_cpu_is_switched_off():
    """detectron2's AMPTrainer needs CUDA: a CPU run trains in fp32, and the config stays frozen."""
    cfg = load_config(FINE, [*TINY, "MODEL.DEVICE", "cpu", "SOLVER.AMP.ENABLED", "True"])
    cfg.freeze()
    validate_config(cfg, training=True)
    assert not cfg.SOLVER.AMP.ENABLED and cfg.is_frozen()


def test_a_refused_run_creates_no_output_dir(tmp_path):
    """OUTPUT_DIR is created by the last pre-run check: a run refused earlier leaves no folder."""
    missing = tmp_path / "new" / "out"
    line = run_train_net(
        ["--config-file", FINE, *TINY, "SOLVER.IMS_PER_BATCH", "0", "OUTPUT_DIR", str(missing)]
    )
    assert "SOLVER.IMS_PER_BATCH 0" in line
    assert not (tmp_path / "new").exists()


def test_output_dir_where_no_file_can_be_created(tmp_path, monkeypatch):
    """A folder that exists but takes no file (permissions, a read-only mount) is refused before
    the run, not when the first log line or checkpoint is written."""
    import errno
    import tempfile

    from fiber_d2.engine.cli import check_output_dir

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    with pytest.raises(ConfigError, match=r"^OUTPUT_DIR .* cannot be written: Permission denied$"):
        check_output_dir(str(tmp_path))


@pytest.mark.parametrize(
    "override, needle",
    [
        (["DATASETS.TRAIN", "('no_such_set',)"], "no_such_set"),
        (["DATASETS.TRAIN", "('bad_input_eval_skips_train',)"], "gone.jpg"),
        (["INPUT.FLIP_PROB", "1.5"], "INPUT.FLIP_PROB"),
        (["INPUT.MAX_SIZE_TRAIN", "0"], "INPUT.MAX_SIZE_TRAIN"),
    ],
)
def test_evaluation_does_not_check_what_only_training_reads(override, needle, tmp_path):
    """--eval-only reads neither the training sets nor the training-only keys: a problem there
    stops a training run before it starts, never an evaluation."""
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.jpg")
    _register_images(tmp_path, "bad_input_eval_skips_train", ["ok.jpg", "gone.jpg"])
    untrained = ["MODEL.WEIGHTS_PARTIAL_OK", "True"]  # the model's weights do not matter here
    opts = [*TINY, *untrained, "OUTPUT_DIR", str(tmp_path / "out"), *override]
    check_before_run(load_config(FINE, opts), training=False, resume=False)
    with pytest.raises((ConfigError, BadRecordError), match=needle):
        check_before_run(load_config(FINE, opts), training=True, resume=False)


@pytest.mark.parametrize(
    "problem",
    ["corrupt", "another tower", "another depth", "text sizes", "text init", "text folder"],
)
def test_tower_weights_checked_before_the_run(problem, out, tmp_path):
    """The towers' own pretrained weights were read by the model's build, after config.yaml and
    log.txt were written (a traceback for the text tower); now one line before anything."""
    from transformers import RobertaConfig

    from fiber_d2.engine.setup import check_tower_weights_available
    from fiber_d2.modeling.backbone.swin import SwinImageTower

    cfg = load_config(FINE, TINY)
    swin = tmp_path / "swin.pth"
    torch.save({"model": SwinImageTower(cfg).imagenet_state_dict()}, swin)
    text = tmp_path / "text"
    lang = cfg.MODEL.LANGUAGE_BACKBONE
    RobertaConfig(hidden_size=lang.HIDDEN_SIZE, num_hidden_layers=lang.NUM_LAYERS).save_pretrained(
        text
    )
    random_init_only = [  # FINE's random-init settings, which pretrained text weights cannot take
        "MODEL.LANGUAGE_BACKBONE.POSITION_INIT_SCALE", "1.0",
        "MODEL.LANGUAGE_BACKBONE.INITIALIZER_RANGE", "0.02",
    ]  # fmt: skip
    fitting = load_config(FINE, [*TINY, "MODEL.SWIN.WEIGHTS", str(swin)])
    check_tower_weights_available(fitting)  # the control: files that fit pass
    fitting = load_config(
        FINE, [*TINY, *random_init_only, "MODEL.LANGUAGE_BACKBONE.WEIGHTS", str(text)]
    )
    check_tower_weights_available(fitting)
    if problem == "corrupt":
        swin.write_bytes(b"not a checkpoint")
        override, message = ["MODEL.SWIN.WEIGHTS", str(swin)], "not a readable checkpoint"
    elif problem == "another tower":
        wide = load_config(FINE, [*TINY, "MODEL.SWIN.EMBED_DIM", "48"])
        torch.save({"model": SwinImageTower(wide).imagenet_state_dict()}, swin)
        override, message = ["MODEL.SWIN.WEIGHTS", str(swin)], "does not fit the tower"
    elif problem == "another depth":  # was an AttributeError traceback from timm's remapping
        deep = load_config(FINE, [*TINY, "MODEL.SWIN.DEPTHS", "[2, 2, 4, 2]"])
        torch.save({"model": SwinImageTower(deep).imagenet_state_dict()}, swin)
        override = ["MODEL.SWIN.WEIGHTS", str(swin)]
        message = f"{swin} does not fit the tower (MODEL.SWIN sizes: DEPTHS [2, 2, 2, 2]): "
    elif problem == "text sizes":
        RobertaConfig(hidden_size=32, num_hidden_layers=lang.NUM_LAYERS).save_pretrained(text)
        override = [*random_init_only, "MODEL.LANGUAGE_BACKBONE.WEIGHTS", str(text)]
        message = f"have (hidden, layers) = (32, {lang.NUM_LAYERS})"
    elif problem == "text init":
        override = ["MODEL.LANGUAGE_BACKBONE.WEIGHTS", str(text)]
        message = "MODEL.LANGUAGE_BACKBONE.POSITION_INIT_SCALE 0.0 applies to a random init only"
    else:
        override = [*random_init_only, "MODEL.LANGUAGE_BACKBONE.WEIGHTS", str(tmp_path / "none")]
        message = "no such directory"
    before = snapshot(out)
    line = run_train_net(["--config-file", FINE, "OUTPUT_DIR", str(out), *TINY, *override])
    assert line.startswith("error: ") and message in line, line
    assert snapshot(out) == before


@pytest.mark.parametrize("path", ["train", "eval"])
def test_unregistered_dataset(path, out):
    before = snapshot(out)
    key = "DATASETS.TRAIN" if path == "train" else "DATASETS.TEST"
    flags = ["--eval-only"] if path == "eval" else []
    line = run_train_net(
        ["--config-file", FINE, *flags, key, "('no_such_set',)", "OUTPUT_DIR", str(out), *TINY]
    )
    assert "dataset 'no_such_set' is not registered" in line
    assert snapshot(out) == before


@pytest.mark.parametrize("path", ["train", "eval"])
@pytest.mark.parametrize(
    "problem",
    ["missing", "not JSON", "no file_name", "a list", "duplicate ids", "unknown category"],
)
def test_annotation_file_missing_or_malformed(problem, path, out, tmp_path):
    """A registered set whose annotation file is gone or broken: one line naming the set and the
    file, before OUTPUT_DIR is touched (with TEST.UNREADABLE_IMAGE_AS_EMPTY too)."""
    name = f"bad_input_annotations_{path}_{problem.replace(' ', '_')}"
    json_file = tmp_path / "annotations.json"
    if problem == "not JSON":
        json_file.write_text('{"images": [')
    elif problem == "no file_name":
        image = {"id": 1, "height": 10, "width": 10}
        categories = [{"id": 1, "name": "circle"}]
        json_file.write_text(
            json.dumps({"images": [image], "annotations": [], "categories": categories})
        )
    elif problem == "a list":  # pycocotools' assertion
        json_file.write_text("[]")
    elif problem in ("duplicate ids", "unknown category"):  # an assertion, a KeyError sentence
        image = {"id": 1, "file_name": "a.png", "height": 10, "width": 10}
        box = {"image_id": 1, "bbox": [1, 1, 4, 4], "area": 16, "iscrowd": 0, "category_id": 1}
        boxes = [dict(box, id=1), dict(box, id=1 if problem == "duplicate ids" else 2)]
        boxes[1]["category_id"] = 1 if problem == "duplicate ids" else 7
        categories = [{"id": 1, "name": "circle"}]
        json_file.write_text(
            json.dumps({"images": [image], "annotations": boxes, "categories": categories})
        )
    register_coco_file(name, json_file)
    before = snapshot(out)
    if path == "train":
        args = ["DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", "()"]
    else:  # the key skips the check of the test images, not that of the annotations
        args = ["--eval-only", "DATASETS.TEST", f"('{name}',)"]
        args += ["TEST.UNREADABLE_IMAGE_AS_EMPTY", "True"]
    line = run_train_net(["--config-file", FINE, *args, "OUTPUT_DIR", str(out), *TINY])
    role = "training" if path == "train" else "test"
    assert f"{role} dataset '{name}': cannot load its annotations" in line
    assert str(json_file) in line
    if problem == "no file_name":
        assert "a record has no field 'file_name'" in line
    if problem == "duplicate ids":
        assert "are not unique" in line
    if problem == "unknown category":
        assert "category_id=7" in line and "no field" not in line
    assert snapshot(out) == before


def test_a_reader_without_its_optional_dependency_is_one_line(tmp_path):
    """The original's Arrow files need pyarrow, which fiber_d2 does not install: its ImportError
    was a traceback from the pre-run check."""
    from fiber_d2.data.datasets.common import load_records

    name = "bad_input_needs_pyarrow"
    arrow = tmp_path / "vqav2_train.arrow"

    def load():
        raise ImportError(f"reading {arrow} needs pyarrow (pip install pyarrow)")

    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    DatasetCatalog.register(name, load)
    with pytest.raises(BadRecordError) as err:
        load_records(name, "training")
    line = one_line_error(err.value)
    assert line.startswith(f"training dataset '{name}': cannot load its annotations")
    assert f"reading {arrow} needs pyarrow" in line


@pytest.mark.parametrize("problem", ["one id, two names", "two ids, one name"])
def test_categories_sharing_an_id_or_a_name(problem, out, tmp_path, caplog):
    """detectron2's loader gave both categories of one id the last one's name and its boxes (a
    silent relabelling); now one line naming the id. Two ids of one name are kept, with a warning:
    their prompts read the same."""
    name = f"bad_input_categories_{problem.replace(' ', '_').replace(',', '')}"
    json_file = tmp_path / "annotations.json"
    image = {"id": 1, "file_name": "a.png", "height": 10, "width": 10}
    Image.new("RGB", (10, 10)).save(tmp_path / "a.png")
    box = {"image_id": 1, "bbox": [1, 1, 4, 4], "area": 16, "iscrowd": 0}
    if problem == "one id, two names":
        categories = [{"id": 1, "name": "circle"}, {"id": 2, "name": "cone"}]
        categories.append({"id": 2, "name": "square"})
    else:
        categories = [{"id": 1, "name": "circle"}, {"id": 2, "name": "circle"}]
    boxes = [dict(box, id=1, category_id=1), dict(box, id=2, category_id=2)]
    data = {"images": [image], "annotations": boxes, "categories": categories}
    register_coco_file(name, json_file, data)
    if problem == "two ids, one name":
        with caplog.at_level(logging.WARNING):
            records = DatasetCatalog.get(name)
        assert [a["category_id"] for a in records[0]["annotations"]] == [0, 1]
        assert f"{json_file}: 1 category name(s) are used by more than one" in caplog.text
        assert "'circle'" in caplog.text
        return
    before = snapshot(out)
    args = ["DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", "()", "OUTPUT_DIR", str(out)]
    line = run_train_net(["--config-file", FINE, *args, *TINY])
    assert line == (
        f"error: {json_file}: category id 2 is given to more than one category (1 repeated id(s) "
        f"in 'categories'); each needs its own id"
    )
    assert snapshot(out) == before


@pytest.mark.parametrize("problem", ["no categories", "empty categories", "ids of two types"])
def test_categories_missing_or_ids_of_two_types(problem, out, tmp_path):
    """Were detectron2's words for them: "min() arg is an empty sequence", "a record has no field
    'categories'" (a top-level list), "'<' not supported between instances of 'str' and 'int'"."""
    name = f"bad_input_{problem.replace(' ', '_')}"
    json_file = tmp_path / "annotations.json"
    Image.new("RGB", (10, 10)).save(tmp_path / "a.png")
    images = [{"id": 1, "file_name": "a.png", "height": 10, "width": 10}]
    data = {"images": images, "annotations": [], "categories": [{"id": 1, "name": "circle"}]}
    if problem == "no categories":
        del data["categories"]
    elif problem == "empty categories":
        data["categories"] = []
    else:
        images.append({"id": "2", "file_name": "b.png", "height": 10, "width": 10})
    register_coco_file(name, json_file, data)
    before = snapshot(out)
    args = ["DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", "()", "OUTPUT_DIR", str(out)]
    line = run_train_net(["--config-file", FINE, *args, *TINY])
    if problem == "ids of two types":
        assert line == (
            f"error: {json_file}: image ids mix types (int, str); give every image an id of one type"
        )
    else:
        assert line == (
            f"error: {json_file}: the 'categories' list is missing or empty; a detection file "
            "names at least one category"
        )
    assert snapshot(out) == before


@pytest.mark.parametrize("problem", ["one id, two images", "one image, two ids"])
def test_images_sharing_an_id_or_a_file(problem, out, tmp_path):
    """Two images of one id (two files concatenated whose ids overlap): detectron2's loader kept
    the second file name and gave it the boxes of both, a silent mislabelling. One file under two
    ids: trained (or evaluated) twice, the second time without its boxes. Now one line naming the
    file and both entries, before the run touches OUTPUT_DIR."""
    name = f"bad_input_images_{problem.replace(' ', '_').replace(',', '')}"
    json_file = tmp_path / "merged.json"
    for file_name in ("a.png", "b.png"):
        Image.new("RGB", (10, 10)).save(tmp_path / file_name)
    if problem == "one id, two images":
        entries = [(1, "a.png"), (1, "b.png")]
        expected = "image id 1 is given to more than one image (a.png and b.png); each image needs"
    else:
        entries = [(1, "a.png"), (2, "a.png")]
        expected = "image a.png is listed twice, as ids 1 and 2; list each image once"
    images = [{"id": i, "file_name": f, "height": 10, "width": 10} for i, f in entries]
    box = {"category_id": 1, "bbox": [1, 1, 4, 4], "area": 16, "iscrowd": 0}
    data = {
        "images": images,
        "annotations": [dict(box, id=1, image_id=1), dict(box, id=2, image_id=entries[1][0])],
        "categories": [{"id": 1, "name": "circle"}],
    }
    register_coco_file(name, json_file, data)
    before = snapshot(out)
    args = ["DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", "()", "OUTPUT_DIR", str(out)]
    line = run_train_net(["--config-file", FINE, *args, *TINY])
    assert line.startswith(f"error: {json_file}: {expected}")
    assert snapshot(out) == before


# ----------------------------------------------------------------------------- images
def _truncated_jpeg(path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:300])


def make_image(kind: str, folder: Path) -> tuple[str, bool]:
    """(path, readable) of one test image."""
    if kind == "truncated JPEG":
        path = folder / "truncated.jpg"
        _truncated_jpeg(path)
        return str(path), False
    if kind == "non-image .jpg":
        path = folder / "text.jpg"
        path.write_bytes(b"this is not an image at all")
        return str(path), False
    if kind == "missing file":
        return str(folder / "missing.jpg"), False
    if kind == OVER_THE_PIXEL_LIMIT:  # with Image.MAX_IMAGE_PIXELS lowered (over_the_limit)
        path = folder / "bomb.png"
        Image.new("RGB", (40, 30)).save(path)
        return str(path), False
    path = folder / f"{kind.replace(' ', '_')}.png"
    if kind == "grayscale PNG":
        Image.new("L", (40, 30), 128).save(path)
    elif kind == "RGBA PNG":
        Image.new("RGBA", (40, 30), (255, 0, 0, 128)).save(path)
    elif kind == "1x1 image":
        Image.new("RGB", (1, 1), (0, 255, 0)).save(path)
    else:  # large image, through the mapper only (tiny resize)
        Image.new("RGB", (5000, 5000)).save(path)
    return str(path), True


# an image PIL refuses to decode (DecompressionBombError: over twice Image.MAX_IMAGE_PIXELS), which
# was a traceback: made of an ordinary image with the limit lowered
OVER_THE_PIXEL_LIMIT = "image over PIL's pixel limit"

IMAGE_KINDS = [
    "truncated JPEG",
    OVER_THE_PIXEL_LIMIT,
    "non-image .jpg",
    "missing file",
    "grayscale PNG",
    "RGBA PNG",
    "1x1 image",
    "5000x5000 image",
]


@pytest.fixture(scope="module")
def tiny_cfg():
    cfg = load_config(FINE, [*TINY, "INPUT.MIN_SIZE_TRAIN", "(32,)", "INPUT.MAX_SIZE_TRAIN", "64"])
    cfg.freeze()
    return cfg


@pytest.fixture
def over_the_limit(monkeypatch):
    """Lowers PIL's pixel limit for the image kind OVER_THE_PIXEL_LIMIT (the 40 x 30 image is over
    twice 500 pixels)."""

    def lower(kind):
        if kind == OVER_THE_PIXEL_LIMIT:
            monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)

    return lower


def _det_record(path, size=None):
    w, h = size or (40, 30)
    return {
        "file_name": path,
        "image_id": 1,
        "height": h,
        "width": w,
        "task": "detection",
        "dataset_name": "shapes_val_det",
        "annotations": [{"bbox": [2, 2, 20, 20], "bbox_mode": 1, "category_id": 0}],
    }


def _size(path):
    try:
        with Image.open(path) as im:
            return im.size
    except IMAGE_READ_ERRORS:
        return None


@pytest.mark.parametrize("kind", IMAGE_KINDS)
def test_image_in_training(kind, tmp_path, tiny_cfg, caplog, over_the_limit):
    path, readable = make_image(kind, tmp_path)
    over_the_limit(kind)
    mapper = GroundingDatasetMapper(tiny_cfg, is_train=True)
    with caplog.at_level(logging.WARNING, logger="fiber_d2.data.mapper"):
        result = mapper(_det_record(path, _size(path)))
    if readable:
        assert result is not None and result["image"].shape[0] == 3
        assert max(result["image"].shape[1:]) <= 64 and mapper.bad.skipped == 0
    else:  # skipped with a counted warning naming the file
        assert result is None and mapper.bad.skipped == 1
        assert os.path.basename(path) in caplog.text and "1 records skipped so far" in caplog.text


@pytest.mark.parametrize("kind", IMAGE_KINDS)
def test_image_in_evaluation(kind, tmp_path, tiny_cfg, over_the_limit):
    path, readable = make_image(kind, tmp_path)
    over_the_limit(kind)
    mapper = GroundingDatasetMapper(tiny_cfg, is_train=False)
    record = _det_record(path, _size(path))
    if readable:
        result = mapper(record)
        assert result["image"].shape[0] == 3 and max(result["image"].shape[1:]) <= 96
        assert "unreadable" not in result
        return
    with pytest.raises(BadRecordError) as err:  # never a substituted record
        mapper(record)
    line = one_line_error(err.value)
    assert path in line and "TEST.UNREADABLE_IMAGE_AS_EMPTY" in line
    cfg = tiny_cfg.clone()
    cfg.defrost()
    cfg.TEST.UNREADABLE_IMAGE_AS_EMPTY = True
    result = GroundingDatasetMapper(cfg, is_train=False)(record)
    assert result["unreadable"] is True and int(result["image"].max()) == 0  # counted, no preds


@pytest.fixture(scope="module")
def predictor():
    torch.manual_seed(0)
    return FIBERPredictor(load_config(FINE, [*TINY, "MODEL.ATSS.INFERENCE_TH", "0.0"]))


@pytest.mark.parametrize("kind", [k for k in IMAGE_KINDS if k != "5000x5000 image"])
def test_image_in_prediction(kind, tmp_path, predictor, over_the_limit):
    path, readable = make_image(kind, tmp_path)
    over_the_limit(kind)
    if readable:
        result = predictor(path, ["red circle", "blue square"])
        assert result["instances"].image_size == tuple(reversed(_size(path)))
        return
    line = run_demo(["--input", path, "--prompt", "red circle", "--opts", *TINY])
    assert path in line or os.path.basename(path) in line


# ----------------------------------------------------------------------------- datasets
def _coco(tmp_path, name, boxes):
    Image.new("RGB", (60, 50)).save(tmp_path / "a.jpg")
    data = {
        "images": [{"id": 1, "file_name": "a.jpg", "height": 50, "width": 60}],
        "annotations": [
            {"id": i, "image_id": 1, "bbox": b, "area": 1.0, "category_id": 1, "iscrowd": 0}
            for i, b in enumerate(boxes)
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    register_coco_file(name, tmp_path / f"{name}.json", data)
    return name


@pytest.mark.parametrize(
    "kind,box",
    [("negative-width box", [30, 5, -10, 10]), ("box outside the image", [200, 5, 9, 9])],
)
def test_bad_box_is_dropped_and_the_image_kept(kind, box, tmp_path, tiny_cfg, caplog):
    name = _coco(tmp_path, "bad_box_" + kind.split()[0].replace("-", "_"), [[5, 5, 20, 20], box])
    with caplog.at_level(logging.WARNING):
        records = DatasetCatalog.get(name)
    assert len(records) == 1 and len(records[0]["annotations"]) == 1  # image kept, box dropped
    assert "a.jpg" in caplog.text and "dropped 1 bad annotation(s)" in caplog.text
    # training sees the kept box; the evaluator drops the same box from its ground truth
    # (tests/evaluation/test_exactly_once.py::test_coco_ground_truth_drops_the_boxes_the_loader_drops)
    out = GroundingDatasetMapper(tiny_cfg, is_train=True, dataset_names=[name])(records[0])
    assert len(out["instances"]) == 1


def test_box_far_beyond_the_image_is_kept_and_clipped(tmp_path, tiny_cfg):
    """As the original, which clamps boxes to the image and drops only those left empty: a box
    reaching 30 px past the right edge of a 60 px wide image is kept, and training sees it clipped
    to the image: legacy x2 = 59 (the last column), scaled with the image, in the mapper's frame
    (legacy + 1, as the kept box's legacy x2 = 24 shows)."""
    name = _coco(tmp_path, "far_box", [[5, 5, 20, 20], [30, 5, 60, 20]])
    records = DatasetCatalog.get(name)
    assert len(records[0]["annotations"]) == 2
    out = GroundingDatasetMapper(tiny_cfg, is_train=True, dataset_names=[name])(records[0])
    boxes, scale = out["instances"].gt_boxes.tensor, out["image"].shape[-1] / 60
    assert len(boxes) == 2
    assert boxes[0, 2].item() == pytest.approx(24 * scale + 1, abs=1e-4)
    assert boxes[1, 2].item() == pytest.approx(59 * scale + 1, abs=1e-4)


def _mdetr(tmp_path, name, caption, spans):
    Image.new("RGB", (60, 50)).save(tmp_path / "g.jpg")
    data = {
        "images": [{"id": 1, "file_name": "g.jpg", "height": 50, "width": 60, "caption": caption}],
        "annotations": [
            {"id": i, "image_id": 1, "bbox": [5, 5, 20, 20], "tokens_positive": [s],
             "category_id": 1, "iscrowd": 0}
            for i, s in enumerate(spans)
        ],  # fmt: skip
    }
    (tmp_path / f"{name}.json").write_text(json.dumps(data))
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_mdetr_grounding(name, str(tmp_path / f"{name}.json"), str(tmp_path), "grounding")
    return name


def test_phrase_span_outside_the_caption(tmp_path, tiny_cfg, predictor, caplog):
    # loader: the annotation is dropped (counted), the entry kept
    name = _mdetr(tmp_path, "span_outside", "a red circle", [[2, 12], [2, 99]])
    with caplog.at_level(logging.WARNING):
        records = DatasetCatalog.get(name)
    assert len(records) == 1 and len(records[0]["annotations"]) == 1
    assert "g.jpg" in caplog.text and "outside the caption" in caplog.text
    # a record built elsewhere: training skips it (counted), evaluation names it
    record = dict(records[0], phrases=[dict(records[0]["phrases"][0], tokens_positive=[[2, 99]])])
    train = GroundingDatasetMapper(tiny_cfg, is_train=True)
    assert train(record) is None and train.bad.skipped == 1
    with pytest.raises(BadRecordError, match="outside the caption") as err:
        GroundingDatasetMapper(tiny_cfg, is_train=False)(record)
    assert "g.jpg" in one_line_error(err.value)
    # prediction
    with pytest.raises(ValueError, match=r"span \[2, 99\) is outside the caption") as err:
        predictor.encode("a red circle", [(2, 99)])
    one_line_error(err.value)


def test_empty_prompt(tmp_path, tiny_cfg, predictor):
    name = _mdetr(tmp_path, "empty_caption", " ", [])
    with pytest.raises(BadRecordError, match="no valid record"):  # the only entry is skipped
        DatasetCatalog.get(name)
    record = {"file_name": str(tmp_path / "g.jpg"), "image_id": 3, "height": 50, "width": 60,
              "task": "grounding", "caption": " ", "phrases": []}  # fmt: skip
    train = GroundingDatasetMapper(tiny_cfg, is_train=True)
    assert train(record) is None and train.bad.skipped == 1
    with pytest.raises(BadRecordError, match="empty caption"):
        GroundingDatasetMapper(tiny_cfg, is_train=False)(record)
    for prompt in ("", []):
        with pytest.raises(ValueError, match="empty prompt") as err:
            predictor.encode(prompt)
        one_line_error(err.value)
    image = tmp_path / "g.jpg"
    line = run_demo(["--input", str(image), "--prompt", " ", "--opts", *TINY])
    assert "empty prompt" in line or "no category name" in line


def test_2000_token_prompt(tmp_path, tiny_cfg, predictor, caplog):
    caption = " ".join(["red circle"] * 1000)  # 2000 words
    phrases = [{"text": "red circle", "tokens_positive": [[0, 10]], "boxes": [[5, 5, 25, 25]]},
               {"text": "red circle", "tokens_positive": [[len(caption) - 10, len(caption)]],
                "boxes": [[30, 5, 50, 25]]}]  # fmt: skip
    record = {"file_name": str(tmp_path / "g.jpg"), "image_id": 4, "height": 50, "width": 60,
              "task": "grounding", "caption": caption, "phrases": phrases,
              "annotations": [{"bbox": [5, 5, 20, 20], "bbox_mode": 1, "phrase_index": 1,
                               "tokens_positive": phrases[1]["tokens_positive"]}]}  # fmt: skip
    Image.new("RGB", (60, 50)).save(tmp_path / "g.jpg")
    for is_train in (True, False):
        caplog.clear()
        mapper = GroundingDatasetMapper(tiny_cfg, is_train=is_train)
        with caplog.at_level(logging.WARNING, logger="fiber_d2.data.mapper"):
            result = mapper(record)
        assert result is not None and mapper.bad.cut_phrases == 1  # counted, named
        assert "g.jpg" in caplog.text and "beyond the 64-token prompt" in caplog.text
    with pytest.raises(ValueError, match="caption needs 20[0-9][0-9] tokens") as err:
        predictor.encode(caption)
    one_line_error(err.value)
    names = [f"shape {i}" for i in range(1000)]  # a long name list is chunked, not truncated
    assert predictor.encode(names)["input_ids"].shape[0] > 1


def test_categories_past_the_prompt_are_counted(tmp_path, tiny_cfg, caplog):
    """A category list longer than the text tower takes, as one prompt: in training with
    FULL_PROMPT_TRAIN its boxes of cut categories had empty target rows, and at test time without
    chunks its cut categories were never predicted, with only a generic truncation warning."""
    name = "bad_input_sixty_categories"
    names = [f"thing number {i}" for i in range(60)]
    MetadataCatalog.get(name).set(thing_classes=names)
    Image.new("RGB", (60, 50)).save(tmp_path / "d.jpg")
    annos = [{"bbox": [5, 5, 20, 20], "bbox_mode": 1, "category_id": c, "iscrowd": 0}
             for c in (0, 30, 59)]  # fmt: skip
    record = {"file_name": str(tmp_path / "d.jpg"), "image_id": 5, "height": 50, "width": 60,
              "task": "detection", "dataset_name": name, "annotations": annos}  # fmt: skip
    cfg = tiny_cfg.clone()
    cfg.defrost()
    cfg.DATASETS.FULL_PROMPT_TRAIN, cfg.DATASETS.DISABLE_SHUFFLE = True, True
    mapper = GroundingDatasetMapper(cfg, is_train=True)
    with caplog.at_level(logging.WARNING, logger="fiber_d2.data.mapper"):
        out = mapper(dict(record))
    assert out["instances"].gt_positive_map.any(dim=1).tolist() == [True, False, False]
    assert mapper.bad.cut_boxes == 2
    assert "d.jpg): 2 box(es) of categories past the 64-token prompt" in caplog.text
    caplog.clear()
    mapper = GroundingDatasetMapper(cfg, is_train=False)  # TEST.CHUNKED_EVALUATION -1: one prompt
    with caplog.at_level(logging.WARNING, logger="fiber_d2.data.mapper"):
        out = mapper(dict(record))
    lost = int((~out["label_token_map"].any(dim=1)).sum())
    assert lost > 0
    assert f"{name}: {lost} of 60 category names lie past the 64-token prompt" in caplog.text
    assert "(first: 'thing number " in caplog.text


def test_a_phrase_without_a_token_is_not_blamed_on_the_prompt_length(tmp_path, tiny_cfg, caplog):
    """Empty target rows were all reported as "beyond the 64-token prompt", also a span of spaces
    in a 10-token caption."""
    caption = "a red  cat"
    phrases = [
        {"text": " ", "tokens_positive": [[5, 7]]},
        {"text": "cat", "tokens_positive": [[7, 10]]},
    ]
    record = {"file_name": str(tmp_path / "g.jpg"), "image_id": 6, "height": 50, "width": 60,
              "task": "grounding", "caption": caption, "phrases": phrases, "annotations": []}  # fmt: skip
    Image.new("RGB", (60, 50)).save(tmp_path / "g.jpg")
    mapper = GroundingDatasetMapper(tiny_cfg, is_train=False)
    with caplog.at_level(logging.WARNING, logger="fiber_d2.data.mapper"):
        mapper(record)
    assert mapper.bad.cut_phrases == 0 and mapper.bad.tokenless_phrases == 1
    assert "g.jpg): 1 phrase(s) inside the prompt cover no token" in caplog.text
    assert "beyond" not in caplog.text


# ----------------------------------------------------------------------------- whole runs
def _register_images(tmp_path, name, files):
    """A COCO-format test set of the given image files (all 64x64, one box each)."""
    data = {
        "images": [
            {"id": i + 1, "file_name": f, "height": 64, "width": 64} for i, f in enumerate(files)
        ],
        "annotations": [
            {"id": i + 1, "image_id": i + 1, "bbox": [8, 8, 24, 24], "area": 576.0,
             "category_id": 1, "iscrowd": 0}
            for i in range(len(files))
        ],  # fmt: skip
        "categories": [{"id": 1, "name": "red circle"}],
    }
    (tmp_path / f"{name}.json").write_text(json.dumps(data))
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_grounding_coco(name, str(tmp_path / f"{name}.json"), str(tmp_path))


def train_line(name: str, out: Path) -> str:
    """The error line of a training run on the registered set ``name`` alone."""
    args = ["DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", "()", "OUTPUT_DIR", str(out)]
    return run_train_net(["--config-file", FINE, *args, *TINY])


def test_training_set_without_a_readable_image(tmp_path, out):
    _truncated_jpeg(tmp_path / "t1.jpg")
    (tmp_path / "t2.jpg").write_bytes(b"not an image")
    _register_images(tmp_path, "bad_input_unreadable_train", ["t1.jpg", "t2.jpg"])
    before = snapshot(out)
    line = train_line("bad_input_unreadable_train", out)
    assert "training dataset 'bad_input_unreadable_train'" in line
    assert "none of its 2 images can be read" in line and "t1.jpg" in line
    assert snapshot(out) == before


def test_missing_training_image_stops_before_the_output_dir(tmp_path, out):
    """Was found only when the loader reached it: a skipped record here, a run stopped mid-way by
    the image-text tasks' mappers (VQA, NLVR2, captions), losing the work since the last checkpoint.
    """
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.jpg")
    _register_images(tmp_path, "bad_input_missing_train", ["ok.jpg", "gone.jpg", "gone2.jpg"])
    before = snapshot(out)
    line = train_line("bad_input_missing_train", out)
    assert "training dataset 'bad_input_missing_train': 2 image file(s) not found" in line
    assert "gone.jpg" in line
    assert snapshot(out) == before


def test_training_set_without_boxes_is_one_line(tmp_path, out):
    """Was detectron2's TrainingSampler error (size 0) after the filter of empty images."""
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.jpg")
    _register_images(tmp_path, "bad_input_no_boxes", ["ok.jpg"])
    data = json.loads((tmp_path / "bad_input_no_boxes.json").read_text())
    (tmp_path / "bad_input_no_boxes.json").write_text(json.dumps(dict(data, annotations=[])))
    before = snapshot(out)
    line = train_line("bad_input_no_boxes", out)
    assert "bad_input_no_boxes" in line and "no image with a usable box" in line
    assert snapshot(out) == before  # found before the run: config.yaml and log.txt as they were


def test_training_set_whose_every_record_is_skipped_is_one_line(tmp_path, out):
    """Was random.sample's "Sample larger than population" traceback from detectron2's loader."""
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (48, 64)).save(tmp_path / name)  # the records say 64x64
    _register_images(tmp_path, "bad_input_every_record_skipped", ["a.jpg", "b.jpg"])
    line = train_line("bad_input_every_record_skipped", out)
    assert "every one of the 2 training records was skipped by the mapper" in line


def test_prompt_override_of_no_category_is_one_line(tmp_path, out):
    """A misspelt category name in a DATASETS.REGISTER prompt override was silently ignored."""
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.jpg")
    _register_images(tmp_path, "bad_input_prompt_typo", ["ok.jpg"])
    json_file = tmp_path / "bad_input_prompt_typo.json"
    entry = f"[['bad_input_prompt_typo_cfg', '{json_file}', '{tmp_path}', {{'red circel': 'a'}}]]"
    before = snapshot(out)
    line = run_train_net(
        ["--config-file", FINE, "DATASETS.REGISTER", entry,
         "DATASETS.TRAIN", "('bad_input_prompt_typo_cfg',)", "DATASETS.TEST", "()",
         "OUTPUT_DIR", str(out), *TINY]
    )  # fmt: skip
    assert "the prompt override names 'red circel', which is not a category" in line
    assert "'red circle'" in line and str(json_file) in line
    assert snapshot(out) == before


@pytest.mark.parametrize("problem", ["missing", "another size"])
def test_bad_test_image_stops_before_the_output_dir(problem, tmp_path, out):
    """A test image that is missing, or (found by the evaluation after the whole run, as the mapper
    refuses it) not of its record's size: one line naming it, OUTPUT_DIR untouched."""
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.jpg")
    if problem == "another size":
        Image.new("RGB", (64, 48)).save(tmp_path / "bad.jpg")  # 48 high, the record says 64
    _register_images(tmp_path, "bad_input_bad_test_image", ["ok.jpg", "bad.jpg"])
    before = snapshot(out)
    line = run_train_net(
        ["--config-file", FINE, "--eval-only", "DATASETS.TEST", "('bad_input_bad_test_image',)",
         "OUTPUT_DIR", str(out), *TINY]
    )  # fmt: skip
    assert "test dataset 'bad_input_bad_test_image'" in line and "bad.jpg" in line
    if problem == "another size":
        assert "the image is 48x64 (height x width), the record says 64x64" in line
    assert snapshot(out) == before


def test_unreadable_as_empty_only_where_the_evaluator_counts_it(tmp_path, out):
    """The image-text evaluators score every image: the pre-run error suggested
    TEST.UNREADABLE_IMAGE_AS_EMPTY for them too, and with it set the run stopped at the same image,
    with the same advice, after building the model."""
    _truncated_jpeg(tmp_path / "cut.jpg")
    _register_images(tmp_path, "bad_input_truncated_retrieval", ["cut.jpg"])
    meta = MetadataCatalog.get("bad_input_truncated_retrieval").as_dict()
    MetadataCatalog.remove("bad_input_truncated_retrieval")
    meta.pop("name")
    MetadataCatalog.get("bad_input_truncated_retrieval").set(
        **dict(meta, evaluator_type="retrieval")
    )
    before = snapshot(out)
    args = ["--config-file", FINE, "--eval-only", "DATASETS.TEST",
            "('bad_input_truncated_retrieval',)", "OUTPUT_DIR", str(out), *TINY]  # fmt: skip
    line = run_train_net(args)
    assert "cut.jpg" in line and "UNREADABLE_IMAGE_AS_EMPTY" not in line
    line = run_train_net([*args, "TEST.UNREADABLE_IMAGE_AS_EMPTY", "True"])
    assert line == (
        "error: TEST.UNREADABLE_IMAGE_AS_EMPTY applies to the evaluators coco, lvis, flickr, refexp; "
        "test dataset 'bad_input_truncated_retrieval' (evaluator 'retrieval') evaluates every "
        "image: fix or drop the unreadable ones"
    )
    assert snapshot(out) == before


def test_truncated_test_image_in_a_run(tmp_path, out):
    """Found by the pre-run decode: one line naming it, OUTPUT_DIR untouched; with the key the
    image is evaluated without predictions and the run completes."""
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.jpg")
    _truncated_jpeg(tmp_path / "cut.jpg")
    _register_images(tmp_path, "bad_input_truncated_test", ["ok.jpg", "cut.jpg"])
    before = snapshot(out)
    args = ["--config-file", FINE, "--eval-only", "DATASETS.TEST",
            "('bad_input_truncated_test',)", "OUTPUT_DIR", str(out), *TINY]  # fmt: skip
    line = run_train_net(args)
    assert "cut.jpg" in line and "TEST.UNREADABLE_IMAGE_AS_EMPTY" in line
    assert snapshot(out) == before
    untrained = ["MODEL.WEIGHTS_PARTIAL_OK", "True"]  # the model's weights do not matter here
    results = train_net.main(
        default_argument_parser().parse_args(
            [*args, "TEST.UNREADABLE_IMAGE_AS_EMPTY", "True", *untrained]
        )
    )
    assert set(results["bbox"]) >= {"AP", "AP50"}  # both images evaluated exactly once
    text = (out / "results.json").read_text()
    assert "NaN" not in text  # strict JSON: an undefined AP is null
    saved = json.loads(text)
    assert set(saved["bbox"]) >= {"AP", "AP50"}
