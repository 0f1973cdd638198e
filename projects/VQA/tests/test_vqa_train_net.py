"""projects/VQA/train_net.py end to end on the shapes questions (3 iterations + evaluation), the
configs, the mapper's bad-input handling and the shapes VQA data."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_argument_parser
from vqa import VQADatasetMapper, answer_vocab

from fiber_d2.data.datasets.common import BadRecordError
from fiber_d2.engine.setup import ConfigError, validate_config

PROJECT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("vqa_train_net", PROJECT / "train_net.py")
train_net = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_net)

VAL_SUBSET = "vqa_test_shapes_val8"
if VAL_SUBSET not in DatasetCatalog.list():  # 8 questions keep the evaluation short
    DatasetCatalog.register(VAL_SUBSET, lambda: DatasetCatalog.get("shapes_val_vqa")[:8])
    MetadataCatalog.get(VAL_SUBSET).set(evaluator_type="vqa")

TINY = [
    "MODEL.SWIN.DEPTHS", "[2, 2, 2, 2]",
    "MODEL.FIBER.NUM_FUSION_LAYERS", "2",
    "INPUT.IMAGE_SIZE", "64",
    "MODEL.SWIN.WINDOW_SIZE", "2",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.MAX_ITER", "3",
    "SOLVER.WARMUP_ITERS", "1",
    "DATASETS.TEST", f"('{VAL_SUBSET}',)",
]  # fmt: skip


def test_three_iterations_then_evaluation(tmp_path):
    args = default_argument_parser().parse_args(
        ["--config-file", str(PROJECT / "configs/shapes.yaml"), *TINY, "OUTPUT_DIR", str(tmp_path)]
    )
    res = train_net.main(args)["vqa"]
    assert res["num_questions"] == 8 and 0.0 <= res["accuracy"] <= 100.0
    assert (tmp_path / "model_final.pth").is_file()
    submit = json.loads((tmp_path / "inference" / VAL_SUBSET / "vqa_submit.json").read_text())
    cfg = train_net.load_vqa_config(str(PROJECT / "configs/shapes.yaml"), TINY)
    vocab = answer_vocab(cfg)
    assert len(submit) == 8 and all(s["answer"] in vocab for s in submit)
    state = torch.load(tmp_path / "model_final.pth", weights_only=True)["model"]
    assert state["vqa_classifier.3.weight"].shape == (len(vocab), 128)
    # without its head (a coarse checkpoint): training starts the head, evaluation refuses
    headless = tmp_path / "headless.pth"
    torch.save({"model": {k: v for k, v in state.items() if "vqa_classifier" not in k}}, headless)
    args = default_argument_parser().parse_args(
        ["--config-file", str(PROJECT / "configs/shapes.yaml"), "--eval-only", *TINY,
         "MODEL.WEIGHTS", str(headless), "OUTPUT_DIR", str(tmp_path / "eval")]
    )  # fmt: skip
    with pytest.raises(SystemExit, match="has no vqa_classifier head"):
        train_net.main(args)


@pytest.mark.long(1)
def test_two_cpu_processes_train_and_evaluate(tmp_path):
    # The fused-task models leave their ITC branch without a gradient; two processes still train.
    opts = [*TINY, "DATASETS.TEST", "('shapes_val_vqa',)", "MODEL.DEVICE", "cpu"]  # later wins
    opts += ["SOLVER.IMS_PER_BATCH", "4"]  # 2 per process: the batch standardisation needs 2
    config = ["--config-file", str(PROJECT / "configs/shapes.yaml")]
    proc = subprocess.run(
        [sys.executable, str(PROJECT / "train_net.py"), "--num-gpus", "2", *config, *opts]
        + ["OUTPUT_DIR", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "World size: 2" in (tmp_path / "log.txt").read_text()
    res = json.loads((tmp_path / "results.json").read_text())["vqa"]
    assert res["num_questions"] == len(DatasetCatalog.get("shapes_val_vqa"))  # each once
    # The evaluation at the end of training answers as model_final.pth does in one process (both
    # ranks read the running statistics of the batch standardisation that rank 0 saved).
    again = tmp_path / "eval_only"
    args = default_argument_parser().parse_args(
        [
            *config,
            "--eval-only",
            *opts,
            "MODEL.WEIGHTS",
            str(tmp_path / "model_final.pth"),
            "OUTPUT_DIR",
            str(again),
        ]
    )
    assert train_net.main(args)["vqa"] == res
    submit = Path("inference") / "shapes_val_vqa" / "vqa_submit.json"
    assert (again / submit).read_text() == (tmp_path / submit).read_text()


def test_shapes_vocabulary_and_targets():
    cfg = train_net.load_vqa_config(str(PROJECT / "configs/shapes.yaml"), TINY)
    vocab = answer_vocab(cfg)
    assert {"yes", "no", "red", "circle", "0", "1", "2"} <= set(vocab) and len(vocab) <= 20
    mapper = VQADatasetMapper(cfg, True, answers=vocab)
    record = DatasetCatalog.get("shapes_train_vqa")[0]
    out = mapper(record)
    assert out["image"].shape == (3, 64, 64) and out["image"].dtype == torch.uint8
    assert out["input_ids"].shape == (cfg.MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN,)
    target = out["vqa_targets"]
    assert target.sum() == 1.0 and vocab[int(target.argmax())] == record["answers"][0]


def test_long_questions_are_truncated_with_a_counted_warning(caplog):
    cfg = train_net.load_vqa_config(str(PROJECT / "configs/shapes.yaml"), TINY)
    mapper = VQADatasetMapper(cfg, False, answers=["yes"])
    record = dict(DatasetCatalog.get("shapes_val_vqa")[0])
    record["question"] = "is there a red circle " * 20 + "?"
    with caplog.at_level("WARNING"):
        out = mapper(record)
        mapper(record)
    assert out["attention_mask"].sum() == cfg.MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN
    assert mapper.truncated == 2 and "2 texts truncated so far" in caplog.text


def test_missing_image_is_one_line_error_naming_it(tmp_path):
    cfg = train_net.load_vqa_config(str(PROJECT / "configs/shapes.yaml"), TINY)
    mapper = VQADatasetMapper(cfg, False, answers=["yes"])
    record = dict(DatasetCatalog.get("shapes_val_vqa")[0], file_name=str(tmp_path / "gone.png"))
    with pytest.raises(BadRecordError, match=r"question \d+: cannot read image .*gone.png") as e:
        mapper(record)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("content", [None, "{not json", '{"yes": 0}'])
def test_unusable_answer_vocabulary_is_one_line_before_anything_is_written(content, tmp_path):
    vocab = tmp_path / "answers.json"
    if content is not None:
        vocab.write_text(content)
    args = default_argument_parser().parse_args(
        ["--config-file", str(PROJECT / "configs/shapes.yaml"), *TINY,
         "VQA.ANSWER_VOCAB", str(vocab), "OUTPUT_DIR", str(tmp_path / "out")]
    )  # fmt: skip
    with pytest.raises(SystemExit) as err:
        train_net.main(args)
    line = str(err.value.code)
    assert line.startswith(
        f"error: VQA.ANSWER_VOCAB {'file not found: ' if content is None else ''}"
    )
    assert str(vocab) in line and "\n" not in line
    assert not (tmp_path / "out").exists()


def test_a_cached_random_transform_is_one_line_before_anything_is_written(tmp_path):
    """INPUT.VL_CACHE_IMAGES with a random training transform, which the VQA mapper refuses, stopped
    the run only after it had written config.yaml and its log."""
    args = default_argument_parser().parse_args(
        ["--config-file", str(PROJECT / "configs/shapes.yaml"), *TINY,
         "INPUT.VL_CACHE_IMAGES", "True", "INPUT.VL_TRAIN_TRANSFORM", "albef_randaug",
         "OUTPUT_DIR", str(tmp_path / "out")]
    )  # fmt: skip
    with pytest.raises(SystemExit) as err:
        train_net.main(args)
    assert str(err.value.code).startswith(
        "error: INPUT.VL_CACHE_IMAGES needs INPUT.VL_TRAIN_TRANSFORM 'resize' in training"
    )
    assert not (tmp_path / "out").exists()


def test_unregistered_vocabulary_dataset_is_a_config_error():
    with pytest.raises(
        ConfigError, match=r"VQA.VOCAB_DATASETS: dataset\(s\) \['nope'\] not registered"
    ):
        train_net.load_vqa_config(
            str(PROJECT / "configs/shapes.yaml"), ["VQA.VOCAB_DATASETS", "('nope',)"]
        )


def test_vocabulary_set_that_cannot_load_is_one_line_naming_answer_vocab(tmp_path):
    """--eval-only checks only the test sets before the run, and the vocabulary's sets (the
    training answers) were read by the model's build: a missing file was a traceback there."""
    name = "vqa_test_vocab_missing"
    missing = tmp_path / "v2_mscoco_train2014_annotations.json"

    def load():
        raise FileNotFoundError(f"VQA annotations file not found: {missing}")

    if name in DatasetCatalog.list():  # this test also runs through tests/test_projects.py
        DatasetCatalog.remove(name)
    DatasetCatalog.register(name, load)
    cfg = train_net.load_vqa_config(
        str(PROJECT / "configs/shapes.yaml"), [*TINY, "VQA.VOCAB_DATASETS", f"('{name}',)"]
    )
    with pytest.raises(ConfigError) as err:
        answer_vocab(cfg)
    line = str(err.value)
    assert f"answer-vocabulary dataset '{name}'" in line and str(missing) in line
    assert line.endswith("give the checkpoint's answer list as VQA.ANSWER_VOCAB")
    assert "\n" not in line


def test_batch_standardisation_needs_two_examples_per_process(monkeypatch):
    path = str(PROJECT / "configs/shapes.yaml")
    cfg = train_net.load_vqa_config(path, TINY)
    assert cfg.MODEL.COARSE.CLS_BATCH_NORM
    validate_config(cfg, training=True)  # 2 in one process
    one = train_net.load_vqa_config(path, [*TINY, "SOLVER.IMS_PER_BATCH", "1"])
    validate_config(one, training=False)  # evaluation uses the running statistics
    with pytest.raises(ConfigError, match="SOLVER.IMS_PER_BATCH 1 over 1 process"):
        validate_config(one, training=True)
    monkeypatch.setattr("detectron2.utils.comm.get_world_size", lambda: 2)
    with pytest.raises(ConfigError, match="SOLVER.IMS_PER_BATCH 2 over 2 process.*gives 1"):
        validate_config(cfg, training=True)


@pytest.mark.parametrize("name", ["shapes.yaml", "vqav2.yaml"])
def test_project_configs_load(name):
    cfg = train_net.load_vqa_config(str(PROJECT / "configs" / name), [])
    validate_config(cfg, training=True)  # every dataset is registered
    assert cfg.MODEL.META_ARCHITECTURE == "FIBERVQA"
    assert cfg.SOLVER.PARAM_GROUP_RULE == "coarse"
    assert cfg.MODEL.SWIN.WINDOW_SIZE * 32 == cfg.INPUT.IMAGE_SIZE
    if name == "vqav2.yaml":  # coarse spec §5.2 task_finetune_vqa
        assert cfg.INPUT.IMAGE_SIZE == 576 and cfg.MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN == 50
        assert cfg.SOLVER.IMS_PER_BATCH == 512 and cfg.SOLVER.BASE_LR == 2e-5
        assert cfg.SOLVER.IMS_PER_DEVICE == 8  # 8 per GPU, accumulated
        assert cfg.SOLVER.LR_MULT_CROSS_MODAL == 5.0 and cfg.SOLVER.LR_MULT_HEAD == 50.0
        assert cfg.SOLVER.MAX_EPOCHS == 10 and cfg.SOLVER.WARMUP_FRACTION == 0.1
        assert cfg.INPUT.VL_TRAIN_TRANSFORM == "albef_randaug" and cfg.VQA.MIN_ANSWER_COUNT == 9
        assert list(cfg.DATASETS.TRAIN) == ["vqav2_train", "vqav2_val"]


def test_config_errors_are_one_line(tmp_path):
    cfg_file = str(PROJECT / "configs/shapes.yaml")
    with pytest.raises(ConfigError, match="VQA.NOPE"):
        train_net.load_vqa_config(cfg_file, ["VQA.NOPE", "1"])
    with pytest.raises(ConfigError, match="not found"):
        train_net.load_vqa_config(str(tmp_path / "nope.yaml"), [])


def test_real_recipe_trains_on_plain_batches():
    """vqav2.yaml inherits DATALOADER.ASPECT_RATIO_GROUPING True from the detector's base config;
    VQA inputs carry no height / width (square images), so the loader must not group them."""
    cfg = train_net.load_vqa_config(
        str(PROJECT / "configs/vqav2.yaml"),
        ["MODEL.LANGUAGE_BACKBONE.TOKENIZER", "builtin:shapes", "INPUT.IMAGE_SIZE", "64",
         "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0", "VQA.MIN_ANSWER_COUNT", "1",
         "DATASETS.TRAIN", "('shapes_train_vqa',)", "VQA.VOCAB_DATASETS", "('shapes_train_vqa',)"],
    )  # fmt: skip
    assert cfg.DATALOADER.ASPECT_RATIO_GROUPING
    batch = next(iter(train_net.Trainer.build_train_loader(cfg)))
    assert len(batch) == 2 and all(d["image"].shape == (3, 64, 64) for d in batch)


def test_max_epochs_counts_the_questions_left_after_the_drop():
    """SOLVER.MAX_EPOCHS counts epochs of the answerable questions, as the original's schedule
    counts its filtered training set."""
    from detectron2.data import get_detection_dataset_dicts
    from vqa.trainer import VQATrainer

    from fiber_d2.engine.schedule import resolve_epoch_schedule

    opts = ["VQA.MIN_ANSWER_COUNT", "40", "SOLVER.MAX_EPOCHS", "2", "SOLVER.IMS_PER_BATCH", "8"]
    cfg = train_net.load_vqa_config(str(PROJECT / "configs/shapes.yaml"), opts)
    questions = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=False)
    kept = VQATrainer.train_records(cfg)
    assert 0 < len(kept) < len(questions)
    resolve_epoch_schedule(cfg, VQATrainer, 1)
    assert cfg.SOLVER.MAX_ITER == 2 * len(kept) // 8


def test_a_question_of_exactly_max_query_len_tokens_is_not_counted_as_truncated(caplog):
    cfg = train_net.load_vqa_config(str(PROJECT / "configs/shapes.yaml"), TINY)
    limit = cfg.MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN
    mapper = VQADatasetMapper(cfg, False, answers=["yes"])
    record = dict(DatasetCatalog.get("shapes_val_vqa")[0])
    question = "red"
    while len(mapper.tokenizer(question)["input_ids"]) < limit:
        question += " red"  # one more token
    assert len(mapper.tokenizer(question)["input_ids"]) == limit  # <s>, the words, </s>
    record["question"] = question
    with caplog.at_level("WARNING"):
        out = mapper(record)
    assert (
        out["attention_mask"].sum() == limit
        and out["input_ids"][-1] == mapper.tokenizer.sep_token_id
    )
    assert mapper.truncated == 0 and "truncated" not in caplog.text
    record["question"] += " red"  # one token too many
    mapper(record)
    assert mapper.truncated == 1


def test_vqa_head_is_linear_layernorm_gelu_linear_and_predicts_the_argmax():
    """Coarse spec §5.3: vqa_classifier = Linear, LayerNorm, GELU, Linear on cls_feats; the
    prediction is the argmax over every answer (the last one included)."""
    import torch.nn.functional as F
    from detectron2.modeling import build_model

    cfg = train_net.load_vqa_config(str(PROJECT / "configs/shapes.yaml"), TINY)
    vocab = answer_vocab(cfg)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    mapper = VQADatasetMapper(cfg, False, answers=vocab)
    batch = [mapper(r) for r in DatasetCatalog.get("shapes_val_vqa")[:3]]
    head = model.vqa_classifier
    with torch.no_grad():
        head[3].bias[-1] = 50.0  # the last answer wins for every question
        head[3].bias[0] = 49.0
        outputs = model(batch)
        x = model.cls_feats_of(batch)
        h = F.linear(x, head[0].weight, head[0].bias)
        h = F.layer_norm(h, (h.shape[-1],), head[1].weight, head[1].bias, head[1].eps)
        expected = F.linear(F.gelu(h), head[3].weight, head[3].bias)
    got = torch.stack([o["vqa_logits"] for o in outputs])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert [o["answer_index"] for o in outputs] == [len(vocab) - 1] * 3


def test_an_explicit_datasets_root_holds_the_shapes_sets(tmp_path, monkeypatch):
    """``register_all_vqa(root)`` reads the shapes sets from ``root/shapes``, as
    ``register_all_builtin(root)`` does, not from the default shapes folder."""
    import vqa.datasets as datasets
    from shapes_registration import assert_shapes_sets_under_root

    assert_shapes_sets_under_root(datasets, "vqa", tmp_path, monkeypatch)
