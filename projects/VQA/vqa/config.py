"""``add_vqa_config``: the VQA project's own config keys (defaults only)."""

from detectron2.config import CfgNode as CN

__all__ = ["add_vqa_config"]


def add_vqa_config(cfg: CN) -> CN:
    """Add the ``VQA`` node (with defaults) to a config that already has fiber_d2's keys.

    Args:
        cfg: a detectron2 config, usually ``add_fiber_config(get_cfg())``.

    Returns:
        the same ``cfg``, for chaining.
    """
    _C = cfg
    _C.VQA = CN()
    # json list of answers (index = class); "" builds the vocabulary from VOCAB_DATASETS
    _C.VQA.ANSWER_VOCAB = ""
    # datasets the vocabulary is built from; () means DATASETS.TRAIN (the original: train + val)
    _C.VQA.VOCAB_DATASETS = ()
    # an answer enters the vocabulary when it is the multiple-choice answer this often (original: 9)
    _C.VQA.MIN_ANSWER_COUNT = 9
    return cfg
