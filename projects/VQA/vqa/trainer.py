"""``VQATrainer``: FIBERTrainer with the VQA mapper, the unanswerable-question filter and the VQA
evaluator; ``load_vqa_config``: fiber_d2's and the project's defaults plus a yaml file."""

from __future__ import annotations

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, get_detection_dataset_dicts

from fiber_d2.engine.setup import ConfigError, load_config
from fiber_d2.engine.trainer import FIBERTrainer

from .config import add_vqa_config
from .evaluator import VQAEvaluator
from .mapper import VQADatasetMapper
from .vocab import answer_vocab, drop_unanswerable, read_vocab_file

__all__ = ["VQATrainer", "load_vqa_config"]


class VQATrainer(FIBERTrainer):
    """Training drops questions without an in-vocabulary answer (counted); evaluation writes
    ``vqa_submit.json`` per test set under ``OUTPUT_DIR/inference/<dataset>/``."""

    test_batch_size = 8

    @classmethod
    def build_mapper(cls, cfg, is_train: bool):
        return VQADatasetMapper(cfg, is_train, answers=answer_vocab(cfg))

    @classmethod
    def train_records(cls, cfg):
        records = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=False)
        return drop_unanswerable(records, answer_vocab(cfg))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name: str, output_folder=None):
        output_folder = cls.inference_folder(cfg, dataset_name, output_folder)
        return VQAEvaluator(dataset_name, answer_vocab(cfg), output_folder)


def load_vqa_config(config_file: str | None, opts: list | None = None) -> CfgNode:
    """fiber_d2's and the project's defaults, a yaml file and ``KEY VALUE`` overrides.

    Raises:
        ConfigError: missing file, unknown key, malformed overrides, an unusable
            ``VQA.ANSWER_VOCAB`` file, an unregistered ``VQA.VOCAB_DATASETS`` name.
    """
    cfg = load_config(config_file, opts, extra_defaults=(add_vqa_config,))
    known = set(DatasetCatalog.list()) | {str(e[0]) for e in cfg.DATASETS.REGISTER if e}
    unknown = [n for n in cfg.VQA.VOCAB_DATASETS if n not in known]
    if unknown:
        raise ConfigError(f"VQA.VOCAB_DATASETS: dataset(s) {unknown} not registered")
    if cfg.VQA.ANSWER_VOCAB:
        read_vocab_file(cfg.VQA.ANSWER_VOCAB)  # before the run writes anything
    return cfg
