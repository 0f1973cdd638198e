"""projects/ImageTower: token labels by hand, the loss, train_net end to end (train, evaluate, export),
and the export loaded through MODEL.SWIN.WEIGHTS into the coarse model of the VL Demo."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model
from image_tower import (
    TokenAccuracyEvaluator,
    TokenLabelMapper,
    presence_loss,
    token_labels,
    token_loss,
)

from fiber_d2.checkpoint import CheckpointError
from fiber_d2.engine.setup import load_config

ROOT = Path(__file__).resolve().parents[3]
PROJECT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("image_tower_train_net", PROJECT / "train_net.py")
train_net = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_net)

VAL_SUBSET = "image_tower_test_shapes_val4"
if VAL_SUBSET not in DatasetCatalog.list():
    DatasetCatalog.register(VAL_SUBSET, lambda: DatasetCatalog.get("shapes_val_det")[:4])
    MetadataCatalog.get(VAL_SUBSET).set(
        thing_classes=MetadataCatalog.get("shapes_val_det").thing_classes
    )

SIZES = [
    "MODEL.SWIN.DEPTHS", "[2, 2, 2, 2]",
    "MODEL.FIBER.NUM_FUSION_LAYERS", "2",
    "INPUT.IMAGE_SIZE", "64",
    "MODEL.SWIN.WINDOW_SIZE", "2",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.MAX_ITER", "3",
    "SOLVER.WARMUP_ITERS", "1",
]  # fmt: skip
TINY = SIZES + [
    "DATASETS.TRAIN", "('shapes_train_det',)",  # the default world: no 2,048-image world to generate
    "DATASETS.TEST", f"('{VAL_SUBSET}',)",
]  # fmt: skip


def test_token_labels_by_hand():
    # 32 px image, stride 8: a 4 x 4 grid of tokens with centres at 4, 12, 20, 28
    boxes = np.array([[0.0, 0.0, 24.0, 16.0], [10.0, 2.0, 14.0, 6.0], [30.0, 30.0, 31.0, 31.0]])
    labels = token_labels(boxes, np.array([2, 5, 0]), 32, 8)
    expected = torch.zeros(4, 4, dtype=torch.long)
    expected[0:2, 0:3] = 3  # centres (x 4/12/20, y 4/12) inside box 0
    expected[0, 1] = 6  # the small box 1 contains the centre (12, 4) and wins over box 0
    expected[3, 3] = 1  # box 2 holds no centre: the token under its centre takes it
    assert torch.equal(labels, expected)
    assert torch.equal(token_labels(np.zeros((0, 4)), np.zeros(0), 32, 8), torch.zeros(4, 4).long())


def test_token_loss_is_the_sum_over_levels_of_mean_cross_entropy():
    torch.manual_seed(0)
    logits = {"res3": torch.randn(2, 4, 4, 5), "res4": torch.randn(2, 2, 2, 5)}
    labels = {"res3": torch.randint(0, 5, (2, 4, 4)), "res4": torch.randint(0, 5, (2, 2, 2))}
    by_hand = 0.0
    for k in logits:
        logp = F.log_softmax(logits[k], -1)
        by_hand += -logp.gather(-1, labels[k][..., None]).mean()
    torch.testing.assert_close(token_loss(logits, labels), by_hand)


def test_presence_loss_is_the_mean_binary_cross_entropy():
    logits = torch.tensor([[2.0, -1.0, 0.0], [0.5, 3.0, -2.0]])
    presence = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    p = torch.sigmoid(logits)
    by_hand = -(presence * p.log() + (1 - presence) * (1 - p).log()).mean()
    torch.testing.assert_close(presence_loss(logits, presence), by_hand)


def test_evaluator_counts_tokens_and_presence_labels_by_hand():
    ev = TokenAccuracyEvaluator("unused")
    ev.reset()
    labels = torch.tensor([[0, 2], [1, 0]])  # two object tokens, two background tokens
    logits = torch.zeros(2, 2, 3)
    logits[0, 0, 0] = logits[0, 1, 2] = logits[1, 0, 2] = logits[1, 1, 1] = 1.0
    record = {"image_id": 1, "token_labels": {"res5": labels}}
    record["presence"] = torch.tensor([1.0, 0.0, 1.0, 0.0])
    out = {
        "token_logits": {"res5": logits},
        "presence_logits": torch.tensor([2.0, 1.0, -1.0, -3.0]),
    }
    ev.process([record], [out])
    res = ev.evaluate()["tokens"]
    # objects: (0,1) right, (1,0) wrong; background: (0,0) right, (1,1) wrong; presence: 2 of 4
    assert res == {"res5_object_acc": 50.0, "res5_background_acc": 50.0, "presence_acc": 50.0}


def test_export_name_and_presence_weight_are_checked_before_training():
    """EXPORT_NAME "" trained to the end, then failed writing the export (NotADirectoryError)."""
    from fiber_d2.engine.setup import ConfigError

    cfg_file = str(PROJECT / "configs/shapes.yaml")
    for bad in ("", "sub/w.pth", ".."):
        with pytest.raises(ConfigError, match="IMAGE_TOWER.EXPORT_NAME must be a file name"):
            train_net.load_image_tower_config(cfg_file, ["IMAGE_TOWER.EXPORT_NAME", bad])
    with pytest.raises(ConfigError, match="IMAGE_TOWER.PRESENCE_WEIGHT -1.0 must be >= 0"):
        train_net.load_image_tower_config(cfg_file, ["IMAGE_TOWER.PRESENCE_WEIGHT", "-1.0"])
    for levels in ("['res9']", "['res4', 'res6']", "[]"):
        with pytest.raises(ConfigError, match=r"IMAGE_TOWER.LEVELS \[.*\] must be outputs"):
            train_net.load_image_tower_config(cfg_file, ["IMAGE_TOWER.LEVELS", levels])
    cfg = train_net.load_image_tower_config(
        cfg_file, ["MODEL.SWIN.OUT_FEATURES", "['res4', 'res5']", "IMAGE_TOWER.LEVELS", "['res5']"]
    )
    assert list(cfg.IMAGE_TOWER.LEVELS) == ["res5"]


def test_mapper_scales_boxes_to_the_square_image():
    cfg = train_net.load_image_tower_config(str(PROJECT / "configs/shapes.yaml"), TINY)
    record = DatasetCatalog.get("shapes_train_det")[0]
    out = TokenLabelMapper(cfg, is_train=True)(record)
    assert out["image"].shape == (3, 64, 64) and out["image"].dtype == torch.uint8
    assert {k: tuple(v.shape) for k, v in out["token_labels"].items()} == {
        "res3": (8, 8),
        "res4": (4, 4),
        "res5": (2, 2),
    }
    # every object labels at least one res3 token with its own category
    cats = {a["category_id"] + 1 for a in record["annotations"]}
    assert cats == set(out["token_labels"]["res3"].unique().tolist()) - {0}
    # the image-level labels: one per category, 1 where the image holds it
    assert out["presence"].shape == (12,)
    assert set(out["presence"].nonzero().flatten().tolist()) == {c - 1 for c in cats}


def test_cached_mapper_reads_each_image_once_and_serves_the_same_inputs(monkeypatch):
    import image_tower.mapper as mapper_module

    reads = []
    real_read = mapper_module.read_vl_image

    def counting_read(record, **kwargs):
        reads.append(record["image_id"])
        return real_read(record, **kwargs)

    monkeypatch.setattr(mapper_module, "read_vl_image", counting_read)
    records = DatasetCatalog.get("shapes_train_det")[:2]
    opts = TINY + ["IMAGE_TOWER.CACHE_INPUTS", "True"]
    cfg = train_net.load_image_tower_config(str(PROJECT / "configs/shapes.yaml"), opts)
    cached = TokenLabelMapper(cfg, is_train=True)
    first = [cached(r) for r in records]
    first[0]["token_labels"].pop("res3")  # a consumer editing its dict does not reach the cache
    again = [cached(r) for r in records + records]
    assert reads == [r["image_id"] for r in records]
    plain_cfg = train_net.load_image_tower_config(
        str(PROJECT / "configs/shapes.yaml"), TINY + ["IMAGE_TOWER.CACHE_INPUTS", "False"]
    )
    plain = TokenLabelMapper(plain_cfg, is_train=True)
    for r, out in zip(records + records, again):
        ref = plain(r)
        assert torch.equal(out["image"], ref["image"]) and out["image_id"] == ref["image_id"]
        assert torch.equal(out["presence"], ref["presence"])
        assert out["token_labels"].keys() == ref["token_labels"].keys()
        assert all(torch.equal(out["token_labels"][k], v) for k, v in ref["token_labels"].items())
    assert len(reads) == 2 + 4  # the uncached mapper reads every time
    # evaluation never caches (each image is seen once)
    assert TokenLabelMapper(cfg, is_train=False)._cache is None


@pytest.mark.parametrize("value", [False, True])
def test_mapper_reads_images_with_input_exif_orientation(monkeypatch, value):
    import image_tower.mapper as mapper_module

    seen = []
    real_read = mapper_module.read_vl_image

    def recording_read(record, **kwargs):
        seen.append(kwargs.get("exif_orientation"))
        return real_read(record, **kwargs)

    monkeypatch.setattr(mapper_module, "read_vl_image", recording_read)
    opts = TINY + ["INPUT.EXIF_ORIENTATION", str(value)]
    cfg = train_net.load_image_tower_config(str(PROJECT / "configs/shapes.yaml"), opts)
    TokenLabelMapper(cfg, is_train=False)(DatasetCatalog.get("shapes_train_det")[0])
    assert seen == [value]


def test_presence_loss_trains_its_classifier_and_is_evaluated(tmp_path):
    opts = TINY + ["IMAGE_TOWER.PRESENCE_WEIGHT", "0.5", "OUTPUT_DIR", str(tmp_path)]
    cfg = train_net.load_image_tower_config(str(PROJECT / "configs/shapes.yaml"), opts)
    model = build_model(cfg)
    mapper = TokenLabelMapper(cfg, is_train=True)
    batch = [mapper(r) for r in DatasetCatalog.get("shapes_train_det")[:2]]
    losses = model(batch)
    assert set(losses) == {"loss_tokens", "loss_presence"}
    _, logits = model.logits(torch.stack([x["image"] for x in batch]))
    target = torch.stack([x["presence"] for x in batch])
    torch.testing.assert_close(losses["loss_presence"], 0.5 * presence_loss(logits, target))
    losses["loss_presence"].backward()
    assert model.presence_classifier.weight.grad.abs().sum() > 0
    assert model.backbone.image_tower.patch_embed.proj.weight.grad.abs().sum() > 0
    # off by default: no classifier, no loss (and no presence_acc: the end-to-end test below)
    plain = build_model(
        train_net.load_image_tower_config(str(PROJECT / "configs/shapes.yaml"), TINY)
    )
    assert plain.presence_classifier is None and set(plain(batch)) == {"loss_tokens"}
    args = default_argument_parser().parse_args(
        ["--config-file", str(PROJECT / "configs/shapes.yaml"), *opts]
    )
    res = train_net.main(args)["tokens"]
    assert 0.0 <= res["presence_acc"] <= 100.0


def test_train_evaluate_export_and_load_through_swin_weights(tmp_path):
    args = default_argument_parser().parse_args(
        ["--config-file", str(PROJECT / "configs/shapes.yaml"), *TINY, "OUTPUT_DIR", str(tmp_path)]
    )
    res = train_net.main(args)["tokens"]
    assert set(res) == {
        f"{k}_{w}_acc" for k in ("res3", "res4", "res5") for w in ("object", "background")
    }
    assert all(0.0 <= v <= 100.0 for v in res.values())
    exported = tmp_path / "swin_weights.pth"
    trained = torch.load(tmp_path / "model_final.pth", weights_only=True)["model"]
    # the coarse model of the VL Demo, its image tower from the export
    coarse_opts = SIZES + ["MODEL.SWIN.WEIGHTS", str(exported)]
    cfg = load_config(str(ROOT / "configs/Demo/coarse_tiny_vl.yaml"), coarse_opts)
    coarse = build_model(cfg).eval()
    state = coarse.state_dict()
    tower_keys = [k for k in trained if k.startswith("backbone.image_tower.")]
    assert len(tower_keys) > 50
    for k in tower_keys:
        assert torch.equal(state[k], trained[k]), k
    # without it, the tower keeps its random initialisation
    cfg_scratch = load_config(
        str(ROOT / "configs/Demo/coarse_tiny_vl.yaml"), SIZES + ["MODEL.SWIN.WEIGHTS", ""]
    )
    scratch = build_model(cfg_scratch).state_dict()
    assert not torch.equal(scratch[tower_keys[0]], trained[tower_keys[0]])


def test_swin_weights_of_other_sizes_are_a_one_line_error(tmp_path):
    args = default_argument_parser().parse_args(
        ["--config-file", str(PROJECT / "configs/shapes.yaml"), *TINY, "SOLVER.MAX_ITER", "1",
         "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path)]
    )  # fmt: skip
    train_net.main(args)
    exported = str(tmp_path / "swin_weights.pth")
    other = SIZES + ["MODEL.SWIN.WEIGHTS", exported, "MODEL.SWIN.EMBED_DIM", "16"]
    with pytest.raises(CheckpointError, match="swin_weights.pth") as e:
        build_model(load_config(str(ROOT / "configs/Demo/coarse_tiny_vl.yaml"), other))
    assert "\n" not in str(e.value)


def test_presence_classifier_reads_the_mean_of_the_last_levels_tokens():
    opts = TINY + ["IMAGE_TOWER.PRESENCE_WEIGHT", "0.5"]
    cfg = train_net.load_image_tower_config(str(PROJECT / "configs/shapes.yaml"), opts)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        _, presence = model.logits(images)
        x = (images.float() - model.pixel_mean) / model.pixel_std
        last = model.backbone.image_tower(x)["res5"]  # the deepest of res3, res4, res5
        expected = model.presence_classifier(last.mean(dim=(2, 3)))
    torch.testing.assert_close(presence, expected)


def test_crowd_annotations_label_no_token_and_no_category():
    cfg = train_net.load_image_tower_config(str(PROJECT / "configs/shapes.yaml"), TINY)
    record = DatasetCatalog.get("shapes_train_det")[0]
    plain = TokenLabelMapper(cfg, is_train=True)(record)
    absent = next(c for c in range(12) if plain["presence"][c] == 0)
    crowd = dict(record["annotations"][0], category_id=absent, iscrowd=1)
    with_crowd = dict(record, annotations=[*record["annotations"], crowd])
    out = TokenLabelMapper(cfg, is_train=True)(with_crowd)
    assert torch.equal(out["presence"], plain["presence"])
    for level, labels in plain["token_labels"].items():
        assert torch.equal(out["token_labels"][level], labels), level
