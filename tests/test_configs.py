"""Every yaml under configs/ loads and merges onto fiber_d2's defaults with no unknown key."""

from pathlib import Path

import pytest
from detectron2.data import DatasetCatalog

from fiber_d2.engine.setup import ConfigError, load_config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
PROJECT_CONFIGS = Path(__file__).resolve().parents[1] / "projects"
ALL_YAMLS = sorted(CONFIG_DIR.rglob("*.yaml"))


def test_there_are_configs():
    names = {p.relative_to(CONFIG_DIR).as_posix() for p in ALL_YAMLS}
    expected = {"Base-FIBER.yaml"} | {
        f"FIBER-B/{n}.yaml"
        for n in (
            "coarse_pretrain",
            "fine_pretrain",
            "coco",
            "lvis_minival",
            "flickr30k",
            "refcoco",
            "refcocoplus",
            "refcocog",
        )
    }
    assert expected <= names
    assert any(n.startswith("Demo/") for n in names)


@pytest.mark.parametrize("path", ALL_YAMLS, ids=lambda p: p.relative_to(CONFIG_DIR).as_posix())
def test_config_merges(path):
    cfg = load_config(str(path))
    assert cfg.MODEL.META_ARCHITECTURE in ("FIBER", "FIBERCoarse")
    s = cfg.SOLVER
    if s.MAX_EPOCHS:  # counted when training starts, milestones at fractions of it
        assert s.MAX_ITER == 0 and all(0 < f < 1 for f in s.STEP_FRACTIONS)
    elif s.MAX_ITER:  # milestones must lie inside the schedule
        assert all(0 < step < s.MAX_ITER for step in s.STEPS) or not s.STEPS
    else:  # a base for other files, which give the schedule
        assert path.name.startswith("Base-")
    # every dataset it names is one fiber_d2 registers (the run would stop at start-up)
    registered = set(DatasetCatalog.list())
    assert set(cfg.DATASETS.TRAIN) | set(cfg.DATASETS.TEST) <= registered


def test_recipes_follow_the_spec():
    pre = load_config(str(CONFIG_DIR / "FIBER-B/fine_pretrain.yaml"))
    assert pre.SOLVER.BASE_LR == 1e-4 and pre.SOLVER.LANG_LR == 1e-5
    assert pre.SOLVER.IMS_PER_BATCH == 64 and pre.SOLVER.MAX_ITER == 800000
    assert tuple(pre.SOLVER.STEPS) == (536000, 712000)
    assert pre.SOLVER.CLIP_GRADIENTS.CLIP_TYPE == "full_model" and pre.SOLVER.EMA.ENABLED
    assert pre.SOLVER.WARMUP_ITERS == 2000 and not pre.MODEL.FIBER.I2T_QUERY_NORM  # fusion v2
    # the refexp variant: fusion v3, a 5,000-iteration warmup, the rest as the pretraining
    pre_ref = load_config(str(CONFIG_DIR / "FIBER-B/fine_pretrain_refexp.yaml"))
    assert pre_ref.MODEL.FIBER.I2T_QUERY_NORM and pre_ref.SOLVER.WARMUP_ITERS == 5000
    pre_ref.defrost()
    pre_ref.MODEL.FIBER.I2T_QUERY_NORM, pre_ref.SOLVER.WARMUP_ITERS = False, 2000
    assert pre_ref == pre
    coco = load_config(str(CONFIG_DIR / "FIBER-B/coco.yaml"))
    assert coco.SOLVER.BASE_LR == 1e-5 and coco.SOLVER.WEIGHT_DECAY == 1e-4
    assert not coco.SOLVER.CLIP_GRADIENTS.ENABLED and coco.SOLVER.AMP.ENABLED
    ref = load_config(str(CONFIG_DIR / "FIBER-B/refcoco.yaml"))
    assert ref.MODEL.FIBER.I2T_QUERY_NORM and ref.INPUT.FLIP_PROB == 0.0
    assert ref.MODEL.ATSS.INFERENCE_TH == 0.0 and ref.MODEL.ATSS.PRE_NMS_TOP_N == 3000
    # epochs of the training set as loaded, x0.1 at 0.67 / 0.89 (counts: tests/engine/test_schedule.py)
    for name, epochs in (("refcoco", 20), ("refcocoplus", 20), ("refcocog", 20), ("coco", 24)):
        cfg = load_config(str(CONFIG_DIR / f"FIBER-B/{name}.yaml"))
        assert cfg.SOLVER.MAX_EPOCHS == epochs and cfg.SOLVER.IMS_PER_BATCH == (
            16 if name.startswith("ref") else 32
        )
        assert tuple(cfg.SOLVER.STEP_FRACTIONS) == (0.67, 0.89)
    coarse = load_config(str(CONFIG_DIR / "FIBER-B/coarse_pretrain.yaml"))
    # 4096 per optimiser step in passes of 8 per process (64 GPUs x 8 x 8 accumulation steps)
    assert coarse.SOLVER.IMS_PER_BATCH == 4096 and coarse.SOLVER.IMS_PER_DEVICE == 8
    assert coarse.SOLVER.MAX_ITER == 100000 and coarse.SOLVER.WARMUP_ITERS == 10000
    lvis = load_config(str(CONFIG_DIR / "FIBER-B/lvis_minival.yaml"))
    assert lvis.TEST.CHUNKED_EVALUATION == 40 and lvis.TEST.FIXED_AP


def test_unknown_key_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("MODEL:\n  SWIN:\n    EMBED_DIMS: 3\n")
    with pytest.raises(ConfigError, match="EMBED_DIMS") as e:
        load_config(str(bad))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="MODEL.NOPE"):
        load_config(None, ["MODEL.NOPE", "1"])


def test_missing_file_is_named():
    with pytest.raises(ConfigError, match="does/not/exist.yaml"):
        load_config("does/not/exist.yaml")


def test_add_fiber_config_twice_keeps_what_was_merged():
    """A second call set every fiber key back to its default (the FIBER-B sizes), silently."""
    from detectron2.config import get_cfg

    from fiber_d2.config import add_fiber_config

    cfg = add_fiber_config(get_cfg())
    cfg.merge_from_file(str(CONFIG_DIR / "Demo/fine_tiny.yaml"))
    merged = cfg.dump()
    assert add_fiber_config(cfg) is cfg and cfg.dump() == merged
    assert (
        cfg.MODEL.FIBER.NUM_FUSION_LAYERS
        != add_fiber_config(get_cfg()).MODEL.FIBER.NUM_FUSION_LAYERS
    )


def test_fine_pretraining_decays_weight_decay_where_the_spec_says():
    """Spec fine §6.2: x0.1 weight decay at 0.667 of each LR milestone, i.e. from iterations
    357,512 and 474,904 of the pre-training (LR steps at 536,000 and 712,000)."""
    from fiber_d2.engine.hooks import weight_decay_multiplier

    pre = load_config(str(CONFIG_DIR / "FIBER-B/fine_pretrain.yaml"))
    assert pre.SOLVER.WEIGHT_DECAY_SCHEDULE
    steps, ratio = tuple(pre.SOLVER.STEPS), pre.SOLVER.WEIGHT_DECAY_SCHEDULE_RATIO
    got = [weight_decay_multiplier(i, steps, ratio) for i in (357511, 357512, 474903, 474904)]
    assert got == pytest.approx([1.0, 0.1, 0.1, 0.01])
