"""projects/Retrieval/train_net.py end to end on the shapes captions: 3 iterations + evaluation."""

import importlib.util
from pathlib import Path

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_argument_parser
from retrieval import ITMRerankRetrievalEvaluator

from fiber_d2.engine.setup import ConfigError, validate_config
from fiber_d2.evaluation import RetrievalEvaluator

PROJECT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("retrieval_train_net", PROJECT / "train_net.py")
train_net = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_net)

VAL_SUBSET = "retrieval_test_shapes_val6"
if VAL_SUBSET not in DatasetCatalog.list():  # 6 validation images keep the evaluation short
    DatasetCatalog.register(VAL_SUBSET, lambda: DatasetCatalog.get("shapes_val_captions")[:6])
    MetadataCatalog.get(VAL_SUBSET).set(evaluator_type="retrieval")

TINY = [
    "MODEL.SWIN.DEPTHS", "[2, 2, 2, 2]",
    "MODEL.FIBER.NUM_FUSION_LAYERS", "2",
    "MODEL.COARSE.QUEUE_SIZE", "16",
    "INPUT.IMAGE_SIZE", "64",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.MAX_ITER", "3",
    "SOLVER.WARMUP_ITERS", "1",
    "SOLVER.CHECKPOINT_PERIOD", "100",
    "DATASETS.TEST", f"('{VAL_SUBSET}',)",
]  # fmt: skip
KEYS = {f"{d}@{k}" for d in ("TR", "IR") for k in (1, 5, 10)}


def _run(config, tmp_path, *extra):
    args = default_argument_parser().parse_args(
        [
            "--config-file",
            str(PROJECT / "configs" / config),
            *TINY,
            *extra,
            "OUTPUT_DIR",
            str(tmp_path),
        ]
    )
    return train_net.main(args)


def test_three_itm_iterations_then_itc_itm_evaluation(tmp_path):
    res = _run("shapes_itm.yaml", tmp_path, "RETRIEVAL.RERANK_K", "2", "RETRIEVAL.ITM_BATCH", "8")
    metrics = res["retrieval"]
    assert KEYS <= set(metrics)
    assert all(0.0 <= metrics[k] <= 100.0 for k in KEYS)
    for d in ("TR", "IR"):  # recall never decreases with K
        assert metrics[f"{d}@1"] <= metrics[f"{d}@5"] <= metrics[f"{d}@10"]
    assert metrics["IR@10"] == pytest.approx(100.0)  # 6 images: the top 10 hold every image
    assert (tmp_path / "model_final.pth").is_file()


def test_evaluator_follows_the_mode():
    itc = train_net.load_retrieval_config(str(PROJECT / "configs" / "shapes_itc.yaml"), TINY)
    evaluator = train_net.Trainer.build_evaluator(itc, VAL_SUBSET)
    assert type(evaluator) is RetrievalEvaluator
    itm = train_net.load_retrieval_config(str(PROJECT / "configs" / "shapes_itm.yaml"), TINY)
    with pytest.raises(ValueError, match="needs the model"):
        train_net.Trainer.build_evaluator(itm, VAL_SUBSET)
    stub = torch.nn.Linear(1, 1)
    evaluator = train_net.Trainer.build_evaluator(itm, VAL_SUBSET, model=stub)
    assert isinstance(evaluator, ITMRerankRetrievalEvaluator) and evaluator._model is stub
    with pytest.raises(ValueError, match="evaluator_type"):
        train_net.Trainer.build_evaluator(itm, "shapes_val_det", model=stub)


def test_itm_evaluator_takes_rerank_k_and_itm_batch_from_the_config():
    """RETRIEVAL.RERANK_K is the number of pairs re-scored per image and text, RETRIEVAL.ITM_BATCH
    the pairs per fused forward: distinct values reach their own evaluator settings."""
    opts = [*TINY, "RETRIEVAL.RERANK_K", "3", "RETRIEVAL.ITM_BATCH", "5"]
    cfg = train_net.load_retrieval_config(str(PROJECT / "configs" / "shapes_itm.yaml"), opts)
    evaluator = train_net.Trainer.build_evaluator(cfg, VAL_SUBSET, model=torch.nn.Linear(1, 1))
    assert evaluator._rerank_k == 3 and evaluator._itm_batch == 5


@pytest.mark.parametrize("name", sorted(p.name for p in (PROJECT / "configs").glob("*.yaml")))
def test_project_configs_load_and_name_registered_datasets(name):
    cfg = train_net.load_retrieval_config(str(PROJECT / "configs" / name), [])
    validate_config(cfg, training=True)  # every dataset is registered
    itm = name.endswith("_itm.yaml")
    assert cfg.RETRIEVAL.MODE == ("itm" if itm else "itc")
    assert cfg.MODEL.META_ARCHITECTURE == ("FIBERRetrievalITM" if itm else "FIBERCoarse")
    assert list(cfg.MODEL.COARSE.LOSSES) == (["itm"] if itm else ["itc"])
    if name.startswith(("coco", "f30k")):  # coarse spec §5.2 recipe
        assert cfg.INPUT.IMAGE_SIZE == (384 if itm else 576)
        assert cfg.MODEL.SWIN.WINDOW_SIZE * 32 == cfg.INPUT.IMAGE_SIZE
        assert cfg.MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN == 50
        assert cfg.SOLVER.BASE_LR == 2e-5 and cfg.SOLVER.IMS_PER_BATCH == 1024
        assert cfg.SOLVER.IMS_PER_DEVICE == (8 if itm else 128)  # the README's per_gpu_batchsize
        assert cfg.SOLVER.LR_MULT_CROSS_MODAL == 5.0 and cfg.SOLVER.LR_MULT_HEAD == 5.0
        assert cfg.SOLVER.MAX_EPOCHS == 10 and cfg.SOLVER.WARMUP_FRACTION == 0.1  # 10 % warmup
        # the counts on the Karpathy train + val captions: tests/engine/test_schedule.py
        assert cfg.DATASETS.TRAIN[0].endswith("_caption_karpathy_train")
        assert cfg.INPUT.VL_TRAIN_TRANSFORM == "albef_randaug"
        # every tower tensor comes from MODEL.WEIGHTS: no roberta-base download (offline: an error)
        assert cfg.MODEL.LANGUAGE_BACKBONE.WEIGHTS == "" and cfg.MODEL.SWIN.WEIGHTS == ""


def test_config_errors_are_one_line(tmp_path):
    cfg_file = str(PROJECT / "configs" / "shapes_itm.yaml")
    with pytest.raises(ConfigError, match="RETRIEVAL.NOPE"):
        train_net.load_retrieval_config(cfg_file, ["RETRIEVAL.NOPE", "1"])
    with pytest.raises(ConfigError, match="MODE"):
        train_net.load_retrieval_config(cfg_file, ["RETRIEVAL.MODE", "exhaustive"])
    with pytest.raises(ConfigError, match="RETRIEVAL.RERANK_K must be at least 1, got 0"):
        train_net.load_retrieval_config(cfg_file, ["RETRIEVAL.RERANK_K", "0"])
    with pytest.raises(ConfigError, match="not found"):
        train_net.load_retrieval_config(str(tmp_path / "nope.yaml"), [])
    cfg = train_net.load_retrieval_config(cfg_file, [])
    assert cfg.MODEL.META_ARCHITECTURE == "FIBERRetrievalITM" and cfg.RETRIEVAL.MODE == "itm"
