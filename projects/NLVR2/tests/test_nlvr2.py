"""projects/NLVR2: the CE loss against a hand computation, the two-pass pair classifier, the evaluator,
train_net end to end (3 iterations + evaluation), the configs and the missing-image error."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from arrow_tables import arrow_file
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model
from nlvr2 import (
    NLVR2DatasetMapper,
    NLVR2Evaluator,
    load_nlvr2_arrow,
    load_nlvr2_json,
    nlvr2_loss,
)
from resumed_runs import finals_that_differ

from fiber_d2.data.datasets.common import BadRecordError
from fiber_d2.engine.setup import load_config, validate_config

PROJECT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("nlvr2_train_net", PROJECT / "train_net.py")
train_net = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_net)

VAL_SUBSET = "nlvr2_test_shapes_val8"
if VAL_SUBSET not in DatasetCatalog.list():
    DatasetCatalog.register(VAL_SUBSET, lambda: DatasetCatalog.get("shapes_val_nlvr2")[:8])
    MetadataCatalog.get(VAL_SUBSET).set(evaluator_type="nlvr2")

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
SHAPES = str(PROJECT / "configs/shapes.yaml")


def test_cross_entropy_against_hand_computation():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.5], [-3.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    hand = 0.0
    for (a, b), y in zip(logits.tolist(), labels.tolist()):
        z = math.log(math.exp(a) + math.exp(b))
        hand += z - (a, b)[y]
    assert nlvr2_loss(logits, labels).item() == pytest.approx(hand / 3, rel=1e-6)


def test_two_independent_fused_passes_feed_the_pair_classifier():
    torch.manual_seed(0)
    model = build_model(load_config(SHAPES, TINY)).eval()
    b, s = 3, 64
    images = torch.randn(2, b, 3, s, s)
    ids = torch.randint(5, 100, (b, 8))
    ids[:, 0], ids[:, -1] = 0, 2
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logits = model.pair_logits(images[0], images[1], ids, mask)
        c0 = model.cls_feats(images[0], ids, mask)  # (sentence, image_0)
        c1 = model.cls_feats(images[1], ids, mask)  # (sentence, image_1)
        expected = model.nlvr2_classifier(torch.cat([c0, c1], dim=-1))
        swapped = model.pair_logits(images[1], images[0], ids, mask)
    assert logits.shape == (b, 2)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(logits, swapped)  # the head sees which image is which


def test_forward_trains_on_the_record_labels_and_predicts_the_argmax():
    """Training: mean cross-entropy of the pair logits against each record's label (1 = True),
    checked by hand; inference: the larger of each record's two logits."""
    torch.manual_seed(0)
    model = build_model(load_config(SHAPES, TINY))
    g = torch.Generator().manual_seed(1)
    batch = []
    for label in (1, 0, 0):
        ids = torch.randint(5, 100, (8,), generator=g)
        ids[0], ids[-1] = 0, 2
        pair = torch.randint(0, 256, (2, 3, 64, 64), generator=g, dtype=torch.uint8)
        batch.append({"image_0": pair[0], "image_1": pair[1], "input_ids": ids,
                      "attention_mask": torch.ones_like(ids), "label": label})  # fmt: skip
    model.train()
    torch.manual_seed(2)
    loss = model(batch)["loss_nlvr2"]
    torch.manual_seed(2)
    logits = model.classify_pairs(model.cls_feats_of(batch, ("image_0", "image_1"))).tolist()
    hand = sum(
        math.log(math.exp(a) + math.exp(b)) - (a, b)[x["label"]] for (a, b), x in zip(logits, batch)
    )
    assert loss.item() == pytest.approx(hand / 3, rel=1e-5)
    model.eval()
    with torch.no_grad():
        outputs = model(batch)
    for out in outputs:
        a, b = out["nlvr2_logits"].tolist()
        assert a != b and out["prediction"] == (1 if b > a else 0)


def test_evaluator_accuracy(tmp_path):
    ev = NLVR2Evaluator("toy", str(tmp_path))
    ev.reset()
    inputs = [{"identifier": f"x-{i}", "label": y} for i, y in enumerate([1, 0, 1, 1])]
    ev.process(inputs, [{"prediction": p} for p in (1, 1, 1, 0)])
    assert ev.evaluate() == {"nlvr2": {"accuracy": 50.0, "num_examples": 4.0}}
    preds = json.loads((tmp_path / "predictions.json").read_text())
    assert preds[1] == {"identifier": "x-1", "prediction": "True"}


def test_three_iterations_then_evaluation(tmp_path):
    args = default_argument_parser().parse_args(
        ["--config-file", SHAPES, *TINY, "OUTPUT_DIR", str(tmp_path)]
    )
    res = train_net.main(args)["nlvr2"]
    assert res["num_examples"] == 8 and 0.0 <= res["accuracy"] <= 100.0
    state = torch.load(tmp_path / "model_final.pth", weights_only=True)["model"]
    assert state["nlvr2_classifier.0.weight"].shape == (128, 256)  # [cls_0 ; cls_1] -> 2D
    assert state["nlvr2_classifier.3.weight"].shape == (2, 128)


def test_a_resumed_stage_trains_as_the_uninterrupted_one(tmp_path):
    """With the feature and image-prefix caches (filled again by the resumed process), a stage
    killed after iteration 4 and resumed from its checkpoint of 2, in a process seeded otherwise,
    ends with the uninterrupted stage's weights, bit for bit."""
    opts = [*TINY, "SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "3", "DATASETS.TEST", "()"]

    def build(out):
        cfg = load_config(SHAPES, [*opts, "OUTPUT_DIR", out])
        cfg.freeze()
        return train_net.Trainer(cfg)

    assert finals_that_differ(build, tmp_path) == []


def test_missing_image_is_one_line_error_naming_the_record(tmp_path):
    mapper = NLVR2DatasetMapper(load_config(SHAPES, TINY), True)
    record = dict(DatasetCatalog.get("shapes_train_nlvr2")[0])
    record["file_name_1"] = str(tmp_path / "missing-img1.png")
    with pytest.raises(
        BadRecordError, match=r"NLVR2 record train-0: cannot read image .*missing-img1"
    ):
        mapper(record)
    ok = mapper(DatasetCatalog.get("shapes_train_nlvr2")[0])
    assert ok["image_0"].shape == ok["image_1"].shape == (3, 64, 64)


@pytest.mark.parametrize("where", ["test", "train"])
def test_missing_image_in_a_run_is_one_error_line(where, tmp_path):
    """A missing image of a test or a training pair stops the run before OUTPUT_DIR is written
    (every test image is decoded first, every training image file looked up), one line naming the
    file and the record; a training image that cannot be decoded is the mapper's line (above)."""
    name = f"nlvr2_test_missing_image_{where}"
    source = "shapes_val_nlvr2" if where == "test" else "shapes_train_nlvr2"
    gone = str(tmp_path / "gone-img1.png")

    def records(source=source):
        rows = [dict(r) for r in DatasetCatalog.get(source)[:8]]
        rows[3]["file_name_1"] = gone
        return rows

    if name in DatasetCatalog.list():  # registered by an earlier run in this process
        DatasetCatalog.remove(name)
    DatasetCatalog.register(name, records)
    MetadataCatalog.get(name).set(evaluator_type="nlvr2")
    sets = (
        ["DATASETS.TEST", f"('{name}',)"] if where == "test" else ["DATASETS.TRAIN", f"('{name}',)"]
    )
    flags = ["--eval-only"] if where == "test" else []
    args = default_argument_parser().parse_args(
        ["--config-file", SHAPES, *flags, *TINY, *sets, "SOLVER.MAX_ITER", "8",
         "OUTPUT_DIR", str(tmp_path / "out")]
    )  # fmt: skip
    with pytest.raises(SystemExit) as err:
        train_net.main(args)
    line = str(err.value.code)
    assert line.startswith("error: ") and "\n" not in line and gone in line
    assert not (tmp_path / "out").exists()  # found before the run starts
    record = DatasetCatalog.get(source)[3]["identifier"]
    if where == "test":
        assert f"test dataset '{name}'" in line and f"{gone} (NLVR2 record {record}): " in line
    else:
        assert f"training dataset '{name}': 1 image file(s) not found" in line
        assert f"NLVR2 record {record}" in line


def test_official_json_lines_release(tmp_path):
    ann = tmp_path / "dev.json"
    rows = [
        {"identifier": "dev-850-0-0", "sentence": "There are two dogs.", "label": "True"},
        {"identifier": "dev-850-0-1", "sentence": "No dogs.", "label": "False"},
    ]
    ann.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    records = load_nlvr2_json(str(ann), str(tmp_path / "dev"), "dev")
    assert [r["label"] for r in records] == [1, 0]
    assert records[0]["file_name_0"].endswith("dev/dev-850-0-img0.png")
    assert records[1]["file_name_1"].endswith("dev/dev-850-0-img1.png")
    ann.write_text(json.dumps({"identifier": "dev-1-0-0", "sentence": "x", "label": "maybe"}))
    with pytest.raises(ValueError, match=r"dev.json:1: label must be"):
        load_nlvr2_json(str(ann), str(tmp_path), "dev")


@pytest.mark.parametrize(
    "row, message",
    [
        ([1, 2], "dev.json:1: an NLVR2 record is a json object"),
        ({"identifier": 7, "sentence": "x", "label": "True"}, "dev.json:1: identifier must be"),
        ({"identifier": "dev-1-0-0", "sentence": None, "label": "True"}, "dev.json:1: sentence"),
    ],
)
def test_malformed_record_is_one_line_naming_the_line(row, message, tmp_path):
    """Each was a TypeError / AttributeError traceback, or transformers' error at the first batch."""
    ann = tmp_path / "dev.json"
    ann.write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=message) as err:
        load_nlvr2_json(str(ann), str(tmp_path), "dev")
    assert "\n" not in str(err.value)


def test_a_json_list_instead_of_json_lines_is_named(tmp_path):
    """A dev.json rewritten as one indented json list read as a JSONDecodeError of line 1."""
    ann = tmp_path / "dev.json"
    row = {"identifier": "dev-1-0-0", "sentence": "x", "label": "True"}
    ann.write_text(json.dumps([row, row], indent=1))
    with pytest.raises(ValueError) as err:
        load_nlvr2_json(str(ann), str(tmp_path), "dev")
    assert str(err.value) == (
        f"{ann}:1: the NLVR2 release is json lines (one json object per line), not a json list "
        "spread over lines"
    )


def test_a_byte_that_is_not_utf8_is_named_with_its_line(tmp_path):
    """It was "'utf-8' codec can't decode byte 0xe9 ...", naming neither the file nor the line."""
    ann = tmp_path / "dev.json"
    good = json.dumps({"identifier": "dev-1-0-0", "sentence": "x", "label": "True"})
    ann.write_bytes(
        (good + "\n").encode() * 2 + b'{"identifier": "dev-2-0-0", "sentence": "caf\xe9"}\n'
    )
    with pytest.raises(ValueError) as err:
        load_nlvr2_json(str(ann), str(tmp_path), "dev")
    assert str(err.value) == f"{ann}:3: not UTF-8 text (byte 0xe9 at column 45)"


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_a_file_without_records_is_one_line(content, tmp_path):
    """It loaded as 0 records; the run then stopped at detectron2's "Dataset is empty" traceback."""
    ann = tmp_path / "dev.json"
    ann.write_text(content)
    with pytest.raises(ValueError) as err:
        load_nlvr2_json(str(ann), str(tmp_path), "dev")
    assert str(err.value) == f"{ann}: the NLVR2 file holds no records (no json line)"


def test_a_folder_for_the_annotation_file_is_named_as_one(tmp_path):
    """It was reported as "file not found"."""
    with pytest.raises(IsADirectoryError) as err:
        load_nlvr2_json(str(tmp_path), str(tmp_path), "dev")
    assert str(err.value) == f"NLVR2 annotation file {tmp_path} is a directory, not a file"


def test_official_train_split_images_sit_in_their_directory(tmp_path):
    """train.json rows name a numbered ``directory`` under the train image folder (the release
    layout ``images/train/<directory>/``); dev / test1 images sit directly in their folder."""
    ann = tmp_path / "train.json"
    row = {"identifier": "train-10171-0-0", "directory": 46, "sentence": "x", "label": "True"}
    ann.write_text(json.dumps(row) + "\n")
    (r,) = load_nlvr2_json(str(ann), str(tmp_path / "train"), "train")
    assert r["file_name_0"] == str(tmp_path / "train" / "46" / "train-10171-0-img0.png")
    assert r["file_name_1"] == str(tmp_path / "train" / "46" / "train-10171-0-img1.png")


def _nlvr2_arrow_columns(**changes) -> dict:
    """Two image pairs of the original's nlvr2 Arrow layout: 2 statements, then 1."""
    columns = {
        "image_0": [b"a", b"b"],
        "image_1": [b"c", b"d"],
        "questions": [["Two dogs.", "No dogs."], ["A cat."]],
        "answers": [["True", "False"], ["False"]],
        "identifier": ["dev-850-0", "dev-851-1"],
        "table_name": ["dev", "dev"],
    }
    columns.update(changes)
    return {k: v for k, v in columns.items() if v is not None}


def test_arrow_rows_become_one_record_per_statement(tmp_path, monkeypatch):
    path = arrow_file(tmp_path / "nlvr2_dev.arrow", _nlvr2_arrow_columns(), monkeypatch)
    records = load_nlvr2_arrow(path)
    assert [(r["identifier"], r["label"], r["arrow_row"]) for r in records] == [
        ("dev-850-0#0", 1, 0),
        ("dev-850-0#1", 0, 0),
        ("dev-851-1#0", 0, 1),
    ]
    assert records[1]["sentence"] == "No dogs." and records[2]["file_name_1"] == f"{path}#1/image_1"


def test_arrow_answers_shorter_than_questions_is_one_line_naming_the_row(tmp_path, monkeypatch):
    """zip() cut the statements without answers: they were dropped without a word."""
    columns = _nlvr2_arrow_columns(answers=[["True", "False"], []])
    path = arrow_file(tmp_path / "nlvr2_dev.arrow", columns, monkeypatch)
    with pytest.raises(ValueError) as err:
        load_nlvr2_arrow(path)
    assert str(err.value) == f"{path} row 1: 1 question(s) but 0 answer(s)"


@pytest.mark.parametrize("rows", [0, 2])
def test_arrow_file_without_statements_is_one_line(rows, tmp_path, monkeypatch):
    """It loaded as 0 records; the run then stopped at detectron2's "Dataset is empty"."""
    columns = _nlvr2_arrow_columns(questions=[[], []], answers=[[], []])
    columns = {k: v[:rows] for k, v in columns.items()}
    path = arrow_file(tmp_path / "nlvr2_dev.arrow", columns, monkeypatch)
    with pytest.raises(ValueError) as err:
        load_nlvr2_arrow(path)
    assert str(err.value) == f"{path}: the NLVR2 arrow file holds no records ({rows} rows)"


@pytest.mark.parametrize("column", ["answers", "image_1"])
def test_arrow_file_without_a_column_is_one_line_naming_it(column, tmp_path, monkeypatch):
    """It was pyarrow's KeyError naming the column only (or, for an image, the mapper's at the
    first batch)."""
    columns = _nlvr2_arrow_columns(**{column: None})
    path = arrow_file(tmp_path / "nlvr2_dev.arrow", columns, monkeypatch)
    with pytest.raises(ValueError) as err:
        load_nlvr2_arrow(path)
    assert str(err.value) == (
        f"{path}: the NLVR2 arrow file has no column {column} (it has {', '.join(columns)})"
    )


@pytest.mark.parametrize("name", ["shapes.yaml", "nlvr2.yaml"])
def test_project_configs_load(name):
    cfg = load_config(str(PROJECT / "configs" / name), [])
    validate_config(cfg, training=True)
    assert cfg.MODEL.META_ARCHITECTURE == "FIBERNLVR2"
    assert cfg.MODEL.SWIN.WINDOW_SIZE * 32 == cfg.INPUT.IMAGE_SIZE
    if name == "nlvr2.yaml":  # coarse spec §5.2 task_finetune_nlvr2
        assert cfg.INPUT.IMAGE_SIZE == 384 and cfg.MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN == 50
        assert cfg.SOLVER.IMS_PER_BATCH == 256 and cfg.SOLVER.BASE_LR == 2e-5
        assert cfg.SOLVER.IMS_PER_DEVICE == 8  # 8 per GPU, accumulated
        assert cfg.SOLVER.LR_MULT_CROSS_MODAL == 5.0 and cfg.SOLVER.LR_MULT_HEAD == 50.0
        # 5 epochs counted at start-up (tests/engine/test_schedule.py), 10 % warmup
        assert cfg.SOLVER.MAX_EPOCHS == 5 and cfg.SOLVER.WARMUP_FRACTION == 0.1
        assert list(cfg.DATASETS.TEST) == ["nlvr2_dev", "nlvr2_test1"]


def test_accuracy_by_statement_kind_against_hand_counts():
    from nlvr2.shapes_demo import accuracy_by_statement_kind, statement_kind

    assert statement_kind("both images contain a red circle") == "both images contain ..."
    assert statement_kind("the right image contains a blue square").startswith("the left / right")
    assert statement_kind("the left image has more circles than the right image").endswith(
        "more ...s"
    )
    assert statement_kind("There are two dogs.") == "other"
    sentences = {
        "b": "both images contain a red circle",
        "c": "the left image contains a blue square",
        "m": "the right image has more triangles than the left image",
    }
    # training: "both" mostly False, "contains" mostly True, "more" unseen (falls back to True)
    train = [{"sentence": sentences[k], "label": int(y)} for k, y in ("b0", "b0", "b1", "c1", "c1")]
    test = [
        {"identifier": "1", "sentence": sentences["b"], "label": 0},
        {"identifier": "2", "sentence": sentences["b"], "label": 1},
        {"identifier": "3", "sentence": sentences["c"], "label": 0},
        {"identifier": "4", "sentence": sentences["m"], "label": 1},
        {"identifier": "5", "sentence": sentences["m"], "label": 0},
    ]
    predictions = {"1": 0, "2": 0, "3": 0, "4": 0, "5": 0}
    rows = accuracy_by_statement_kind(train, test, predictions)
    assert rows == {
        "both images contain ...": {"value": 50.0, "baseline": 50.0},
        "the left / right image contains ...": {"value": 100.0, "baseline": 0.0},
        "the left / right image has more ...s": {"value": 50.0, "baseline": 50.0},
    }
    # a kind unseen in training is judged True by the baseline
    unseen = [{"identifier": "4", "sentence": sentences["m"], "label": 1}]
    assert accuracy_by_statement_kind(train, unseen, predictions) == {
        "the left / right image has more ...s": {"value": 0.0, "baseline": 100.0}
    }


def test_statement_kind_baseline_is_the_majority_training_label():
    """The baseline judges each statement by its kind's commonest training label: "both" is False
    in 3 of 4 training statements, "contains" True in 2 of 3, so on test statements whose labels
    are those majorities the baseline scores 100, whatever the model predicts."""
    from nlvr2.shapes_demo import accuracy_by_statement_kind

    both = "both images contain a red circle"
    contains = "the left image contains a blue square"
    train = [{"sentence": both, "label": y} for y in (0, 1, 0, 0)]
    train += [{"sentence": contains, "label": y} for y in (1, 0, 1)]
    test = [
        {"identifier": "1", "sentence": both, "label": 0},
        {"identifier": "2", "sentence": both, "label": 0},
        {"identifier": "3", "sentence": contains, "label": 1},
    ]
    rows = accuracy_by_statement_kind(train, test, {"1": 1, "2": 0, "3": 0})
    assert rows == {
        "both images contain ...": {"value": 50.0, "baseline": 100.0},
        "the left / right image contains ...": {"value": 0.0, "baseline": 100.0},
    }


def test_real_recipe_trains_on_plain_batches():
    """nlvr2.yaml inherits DATALOADER.ASPECT_RATIO_GROUPING True from the detector's base config;
    NLVR2 pairs carry no height / width (square inputs), so the loader must not group them."""
    cfg = load_config(
        str(PROJECT / "configs/nlvr2.yaml"),
        ["MODEL.LANGUAGE_BACKBONE.TOKENIZER", "builtin:shapes", "INPUT.IMAGE_SIZE", "64",
         "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
         "DATASETS.TRAIN", "('shapes_train_nlvr2',)"],
    )  # fmt: skip
    assert cfg.DATALOADER.ASPECT_RATIO_GROUPING
    batch = next(iter(train_net.Trainer.build_train_loader(cfg)))
    assert len(batch) == 2 and all(d["image_0"].shape == (3, 64, 64) for d in batch)


def test_an_explicit_datasets_root_holds_the_shapes_sets(tmp_path, monkeypatch):
    """``register_all_nlvr2(root)`` reads the shapes sets from ``root/shapes``, as
    ``register_all_builtin(root)`` does, not from the default shapes folder."""
    import nlvr2.datasets as datasets
    from shapes_registration import assert_shapes_sets_under_root

    assert_shapes_sets_under_root(datasets, "nlvr2", tmp_path, monkeypatch)
