"""projects/Captioning/train_net.py end to end on the shapes captions: a few iterations of every
stage, then beam-search evaluation with BLEU-4 / CIDEr."""

import importlib.util
import json
import logging
from pathlib import Path

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_argument_parser

from fiber_d2.data.datasets.captions import load_captions
from fiber_d2.engine.setup import ConfigError, validate_config

PROJECT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("captioning_train_net", PROJECT / "train_net.py")
train_net = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_net)

VAL_SUBSET = "captioning_test_shapes_val4"
if VAL_SUBSET not in DatasetCatalog.list():  # 4 validation images keep the evaluation short
    DatasetCatalog.register(VAL_SUBSET, lambda: DatasetCatalog.get("shapes_val_captions")[:4])
    MetadataCatalog.get(VAL_SUBSET).set(evaluator_type="caption")

TINY = [
    "MODEL.SWIN.DEPTHS", "[2, 2, 2, 2]",
    "MODEL.FIBER.NUM_FUSION_LAYERS", "2",
    "INPUT.IMAGE_SIZE", "64",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.MAX_ITER", "2",
    "SOLVER.WARMUP_ITERS", "1",
    "SOLVER.CHECKPOINT_PERIOD", "100",
    "CAPTION.MAX_LENGTH", "6",
    "CAPTION.BEAM_SIZE", "2",
    "DATASETS.TEST", f"('{VAL_SUBSET}',)",
]  # fmt: skip


def _run(tmp_path, *extra, flags=()):
    args = default_argument_parser().parse_args(
        [*flags, "--config-file", str(PROJECT / "configs" / "shapes_mle.yaml"), *TINY, *extra]
        + ["OUTPUT_DIR", str(tmp_path)]
    )
    return train_net.main(args)


@pytest.mark.parametrize("stage", ["mle", "gold", "cider"])
def test_train_then_evaluate(tmp_path, stage):
    extra = [
        "CAPTION.STAGE",
        stage,
        "CAPTION.GOLD_UPDATE_PERIOD",
        "1",
        "CAPTION.CIDER_SAMPLES",
        "2",
    ]
    res = _run(tmp_path, *extra)["caption"]
    assert set(res) == {"BLEU-4", "CIDEr"}
    assert all(0.0 <= v for v in res.values())
    assert (tmp_path / "model_final.pth").is_file()
    captions = json.loads((tmp_path / "inference" / VAL_SUBSET / "caption.json").read_text())
    assert len(captions) == 4 and all(isinstance(c["caption"], str) for c in captions)
    # --eval-only of the trained weights gives the same scores
    weights = str(tmp_path / "model_final.pth")
    again = _run(tmp_path, *extra, "MODEL.WEIGHTS", weights, flags=["--eval-only"])
    assert again["caption"] == pytest.approx(res)


@pytest.mark.parametrize("name", sorted(p.name for p in (PROJECT / "configs").glob("*.yaml")))
def test_project_configs_load_and_follow_the_recipe(name):
    cfg = train_net.load_captioning_config(str(PROJECT / "configs" / name), [])
    checked = cfg.clone()
    checked.MODEL.WEIGHTS = ""  # the previous stage's output does not exist here
    validate_config(checked, training=True)  # every dataset is registered
    assert cfg.MODEL.META_ARCHITECTURE == "FIBERCaption"
    if name.startswith("coco"):  # coarse spec §5.2
        stage = name[len("coco_") : -len(".yaml")]
        assert cfg.CAPTION.STAGE == stage
        assert cfg.INPUT.IMAGE_SIZE == 576 and cfg.MODEL.SWIN.WINDOW_SIZE == 18
        assert cfg.MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN == 50 and cfg.CAPTION.MAX_LENGTH == 50
        assert cfg.SOLVER.IMS_PER_BATCH == 512 and cfg.SOLVER.MAX_EPOCHS == 10
        assert cfg.SOLVER.IMS_PER_DEVICE == 8  # per_gpu_batchsize 8, accumulated
        assert cfg.SOLVER.WARMUP_FRACTION == 0.1
        assert cfg.SOLVER.BASE_LR == {"mle": 5e-5, "gold": 1e-5, "cider": 1e-6}[stage]
        assert cfg.SOLVER.LR_MULT_CROSS_MODAL == 5.0 and cfg.SOLVER.LR_MULT_HEAD == 5.0
        assert cfg.INPUT.VL_TRAIN_TRANSFORM == "albef_randaug"
        previous = {"gold": "coco_mle", "cider": "coco_gold"}.get(stage)
        if previous:
            assert cfg.MODEL.WEIGHTS == f"output/captioning/{previous}/model_final.pth"


def test_config_errors_are_one_line():
    cfg_file = str(PROJECT / "configs" / "shapes_mle.yaml")
    with pytest.raises(ConfigError, match="CAPTION.NOPE"):
        train_net.load_captioning_config(cfg_file, ["CAPTION.NOPE", "1"])
    with pytest.raises(ConfigError, match="STAGE"):
        train_net.load_captioning_config(cfg_file, ["CAPTION.STAGE", "ppo"])
    with pytest.raises(ConfigError, match=r"CAPTION.METRICS: unknown \['ROUGE'\]"):
        train_net.load_captioning_config(cfg_file, ["CAPTION.METRICS", "['BLEU', 'ROUGE']"])
    with pytest.raises(ConfigError, match="CAPTION.BEAM_SIZE must be at least 1, got 0"):
        train_net.load_captioning_config(cfg_file, ["CAPTION.BEAM_SIZE", "0"])
    # a ZeroDivisionError at the GOLD stage's first iteration; mixes outside [0, 1] trained on
    with pytest.raises(ConfigError, match="CAPTION.GOLD_UPDATE_PERIOD must be at least 1, got 0"):
        train_net.load_captioning_config(cfg_file, ["CAPTION.GOLD_UPDATE_PERIOD", "0"])
    with pytest.raises(ConfigError, match="CAPTION.CIDER_ALPHA must be between 0 and 1, got 1.5"):
        train_net.load_captioning_config(cfg_file, ["CAPTION.CIDER_ALPHA", "1.5"])
    with pytest.raises(ConfigError, match="CAPTION.GOLD_MIN_WEIGHT must be between 0 and 1"):
        train_net.load_captioning_config(cfg_file, ["CAPTION.GOLD_MIN_WEIGHT", "-0.1"])


def test_empty_training_captions_are_counted_and_skipped(tmp_path, caplog):
    path = tmp_path / "caps.jsonl"
    lines = [
        {"file_name": "a.png", "image_id": 1, "captions": ["a cat", "", "  "]},
        {"file_name": "b.png", "image_id": 2, "captions": [""]},
        {"file_name": "c.png", "image_id": 3, "captions": ["a dog"]},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines))
    with caplog.at_level(logging.WARNING):
        records = load_captions(str(path), str(tmp_path), "caps")
    assert [r["caption"] for r in records] == ["a cat", "a dog"]
    assert "3 empty captions" in caplog.text


def test_shapes_demo_runner_takes_overrides_and_scores_the_named_shapes(tmp_path):
    """The ``make demo-vl`` runner: trailing overrides reach its config, the summary carries the
    caption metrics and the category agreement of the captions it wrote, and pictures."""
    from captioning.shapes_demo import category_agreement, run

    summary = run(None, tmp_path, opts=tuple(TINY))
    assert (summary["task"], summary["metric"]) == ("captioning", "CIDEr")
    assert summary["value"] == summary["metrics"]["CIDEr"]
    generated = {
        c["image_id"]: c["caption"] for c in json.loads(Path(summary["caption_json"]).read_text())
    }
    assert len(generated) == 4  # DATASETS.TEST of the overrides: 4 validation images
    refs = {r["image_id"]: r["captions"] for r in DatasetCatalog.get(VAL_SUBSET)}
    expected = category_agreement(generated, refs)
    assert {k: summary["metrics"][k] for k in expected} == expected
    assert len(summary["pictures"]) == 4 and all(Path(p).is_file() for p in summary["pictures"])
