"""Epoch-based schedules (``SOLVER.MAX_EPOCHS``): the original's two counting rules on the published
dataset sizes, hand cases, bad values, and a run whose written config holds the counted schedule."""

import json

import pytest
import yaml
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_argument_parser
from tool_scripts import load_tool

from fiber_d2.config import add_fiber_config
from fiber_d2.engine.schedule import epoch_schedule, resolve_epoch_schedule
from fiber_d2.engine.setup import ConfigError, load_config, validate_config
from fiber_d2.engine.trainer import FIBERTrainer

train_net = load_tool("train_net")

SUBSET = "schedule_test_shapes5"  # 5 training images: 1 epoch at batch 2 is 2 iterations
if SUBSET not in DatasetCatalog.list():
    DatasetCatalog.register(SUBSET, lambda: DatasetCatalog.get("shapes_train_det")[:5])
    meta = MetadataCatalog.get("shapes_train_det").as_dict()
    meta.pop("name")
    MetadataCatalog.get(SUBSET).set(**meta)


@pytest.mark.parametrize(
    "config, records, max_iter, steps",
    [
        # maskrcnn-benchmark's rule, epochs x records // batch, milestones at 0.67 / 0.89; the
        # same figures the configs held as constants before (COCO: train2017 before filtering)
        ("configs/FIBER-B/refcoco.yaml", 120_624, 150_780, (101_023, 134_194)),
        ("configs/FIBER-B/refcocoplus.yaml", 120_191, 150_238, (100_659, 133_712)),
        ("configs/FIBER-B/refcocog.yaml", 80_512, 100_640, (67_429, 89_570)),
        ("configs/FIBER-B/coco.yaml", 118_287, 88_715, (59_439, 78_956)),
        ("configs/FIBER-B/coco.yaml", 117_266, 87_949, (58_926, 78_275)),
        ("configs/FIBER-B/lvis_minival.yaml", 100_170, 75_127, (50_335, 66_863)),
    ],
)
def test_fine_grained_recipes_count_images_per_batch(config, records, max_iter, steps):
    cfg = load_config(config)
    assert cfg.SOLVER.IMS_PER_DEVICE == 0
    schedule = epoch_schedule(cfg, records, world_size=16)  # the rule ignores the GPU count
    assert schedule == {"MAX_ITER": max_iter, "STEPS": steps, "WARMUP_ITERS": 2000}


@pytest.mark.parametrize(
    "config, records, max_iter",
    [
        # Lightning's rule on the README's 8 GPUs: passes per process per epoch x epochs // accumulation
        ("projects/NLVR2/configs/nlvr2.yaml", 86_373, 1_687),  # ceil(ceil(86,373/8)/8)=1,350 x5 //4
        (
            "projects/Retrieval/configs/coco_itc.yaml",
            439_123,
            4_290,
        ),  # 128 per pass, no accumulation
        ("projects/Retrieval/configs/coco_itm.yaml", 439_123, 4_288),  # 6,862 x 10 // 16
        ("projects/Retrieval/configs/f30k_itc.yaml", 150_070, 1_470),
        ("projects/Retrieval/configs/f30k_itm.yaml", 150_070, 1_465),
        ("projects/Captioning/configs/coco_mle.yaml", 439_123, 8_577),
    ],
)
def test_coarse_recipes_count_passes_per_process(config, records, max_iter):
    from fiber_d2.engine.setup import _merge_file  # the project keys are not needed here

    cfg = get_cfg()
    add_fiber_config(cfg)
    cfg.set_new_allowed(True)
    _merge_file(cfg, config)
    schedule = epoch_schedule(cfg, records, world_size=8)
    assert schedule["MAX_ITER"] == max_iter
    assert schedule["WARMUP_ITERS"] == int(0.1 * max_iter)  # 10 % warmup


def _solver(epochs, batch, per_device=0, fractions=(), warmup=0.0):
    cfg = get_cfg()
    add_fiber_config(cfg)
    s = cfg.SOLVER
    s.MAX_EPOCHS, s.IMS_PER_BATCH, s.IMS_PER_DEVICE = epochs, batch, per_device
    s.STEP_FRACTIONS, s.WARMUP_FRACTION, s.WARMUP_ITERS = fractions, warmup, 7
    return cfg


def test_hand_cases():
    # 9 records, 2 epochs, 4 per step on 2 processes in passes of 2: each process draws
    # ceil(9 / 2) = 5 records per epoch in ceil(5 / 2) = 3 passes -> 6 steps (the last passes
    # short), where counting images gives 2 x 9 // 4 = 4
    assert epoch_schedule(_solver(2, 4, per_device=2), 9, 2)["MAX_ITER"] == 6
    assert epoch_schedule(_solver(2, 4), 9, 2)["MAX_ITER"] == 4
    # 1 pass of 1 per process on 2 processes, accumulation 2: 5 passes per epoch x 3 // 2 = 7
    assert epoch_schedule(_solver(3, 4, per_device=1), 10, 2)["MAX_ITER"] == 7
    # milestones at fractions of the result; the warmup kept when no fraction is given
    got = epoch_schedule(_solver(1, 4, fractions=(0.5, 0.75)), 41, 1)
    assert got == {"MAX_ITER": 10, "STEPS": (5, 8), "WARMUP_ITERS": 7}
    assert epoch_schedule(_solver(1, 2, warmup=0.25), 41, 1)["WARMUP_ITERS"] == 5


def test_bad_values_are_one_line_errors():
    with pytest.raises(
        ConfigError,
        match=r"^SOLVER.MAX_EPOCHS 1 over 3 training record\(s\) at SOLVER.IMS_PER_BATCH 32 "
        "gives no iteration$",
    ):
        epoch_schedule(_solver(1, 32), 3, 1)
    for opts, match in (
        (["SOLVER.MAX_EPOCHS", "2"], "MAX_EPOCHS 2 and SOLVER.MAX_ITER 1300 are both set"),
        (["SOLVER.MAX_ITER", "0"], "SOLVER.MAX_ITER 0: give the iterations"),
        (["SOLVER.STEP_FRACTIONS", "(0.9, 0.5)"], "STEP_FRACTIONS"),
        (["SOLVER.STEP_FRACTIONS", "(0.5, 1.5)"], "STEP_FRACTIONS"),
        (["SOLVER.MAX_EPOCHS", "-1"], "MAX_EPOCHS"),
        (["SOLVER.WARMUP_FRACTION", "1.0"], "WARMUP_FRACTION"),
    ):
        cfg = load_config("configs/Demo/fine_tiny.yaml", [*opts, "DATASETS.TEST", "()"])
        with pytest.raises(ConfigError, match=match):
            validate_config(cfg, training=True)


def test_resolution_counts_the_loader_records_and_reads_each_set_once():
    cfg = load_config(
        "configs/Demo/fine_tiny.yaml",
        ["SOLVER.MAX_EPOCHS", "3", "SOLVER.MAX_ITER", "0", "SOLVER.IMS_PER_BATCH", "8"]
        + ["SOLVER.STEP_FRACTIONS", "(0.5,)"],
    )
    records = len(FIBERTrainer.train_records(cfg))
    name = "shapes_train_det"
    loader, reads = DatasetCatalog[name], []
    DatasetCatalog.remove(name)
    DatasetCatalog.register(name, lambda: reads.append(1) or loader())
    try:
        resolve_epoch_schedule(cfg, FIBERTrainer, 1)
        assert FIBERTrainer.train_records(cfg)  # the loader's records: served, not read again
        assert len(reads) == 1  # one of the config's training sets
    finally:
        DatasetCatalog.remove(name)
        DatasetCatalog.register(name, loader)
    assert records == 768  # the Demo's detection + grounding sets
    assert cfg.SOLVER.MAX_ITER == 3 * records // 8 == 288
    assert tuple(cfg.SOLVER.STEPS) == (144,) and cfg.SOLVER.MAX_EPOCHS == 0
    untouched = load_config("configs/Demo/fine_tiny.yaml")
    before = (untouched.SOLVER.MAX_ITER, tuple(untouched.SOLVER.STEPS))
    resolve_epoch_schedule(untouched, FIBERTrainer, 1)  # MAX_EPOCHS 0: nothing changes
    assert (untouched.SOLVER.MAX_ITER, tuple(untouched.SOLVER.STEPS)) == before


def test_training_runs_the_counted_schedule_and_writes_it(tmp_path):
    tiny = [
        "MODEL.SWIN.DEPTHS", "[2, 2, 2, 2]", "MODEL.FIBER.NUM_FUSION_LAYERS", "2",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_EPOCHS", "1", "SOLVER.MAX_ITER", "0",
        "SOLVER.WARMUP_ITERS", "1",
        "DATASETS.TRAIN", f"('{SUBSET}',)",
        "SOLVER.STEP_FRACTIONS", "(0.5,)", "DATASETS.TEST", "()", "TEST.EVAL_PERIOD", "0",
        "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(tmp_path),
    ]  # fmt: skip
    args = default_argument_parser().parse_args(
        ["--config-file", "configs/Demo/fine_tiny.yaml", *tiny]
    )
    train_net.main(args)
    written = yaml.safe_load((tmp_path / "config.yaml").read_text())["SOLVER"]
    assert written["MAX_ITER"] == 5 // 2 == 2 and written["MAX_EPOCHS"] == 0
    assert written["STEPS"] == [1]
    lines = (tmp_path / "metrics.json").read_text().splitlines()
    metrics = [json.loads(line) for line in lines]
    assert max(m["iteration"] for m in metrics) == 1  # iterations 0 and 1
