"""``add_retrieval_config``: the Retrieval project's own config keys (defaults only).

fiber_d2's keys come from :func:`fiber_d2.config.add_fiber_config`; this adds ``cfg.RETRIEVAL``.
"""

from detectron2.config import CfgNode as CN

__all__ = ["add_retrieval_config"]


def add_retrieval_config(cfg: CN) -> CN:
    """Add the ``RETRIEVAL`` node (with defaults) to a config that already has fiber_d2's keys.

    Args:
        cfg: a detectron2 config, usually ``add_fiber_config(get_cfg())``.

    Returns:
        the same ``cfg``, for chaining.
    """
    _C = cfg
    _C.RETRIEVAL = CN()
    # Evaluation scores: "itc" (cosine of the unimodal embeddings, every pair) or "itm" (ITC for every
    # pair, then the fused ITM match logit on the top RERANK_K pairs of each image and of each text).
    _C.RETRIEVAL.MODE = "itc"
    # Pairs re-ranked by ITM per image (TR) and per text (IR). UNDETERMINED in the spec (the released
    # code scores every pair exhaustively); 128 is our choice, the recall K values are at most 10. A
    # value at least the number of texts (25,010 for COCO 5K) scores every pair, as the release does.
    _C.RETRIEVAL.RERANK_K = 128
    # Image-text pairs per fused ITM forward at evaluation (the original scores texts in batches of 64).
    _C.RETRIEVAL.ITM_BATCH = 64
    return cfg
