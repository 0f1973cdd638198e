"""``add_captioning_config``: the Captioning project's own config keys (defaults only).

fiber_d2's keys come from :func:`fiber_d2.config.add_fiber_config`; this adds ``cfg.CAPTION``.
"""

from detectron2.config import CfgNode as CN

__all__ = ["add_captioning_config"]


def add_captioning_config(cfg: CN) -> CN:
    """Add the ``CAPTION`` node (with defaults) to a config that already has fiber_d2's keys.

    Args:
        cfg: a detectron2 config, usually ``add_fiber_config(get_cfg())``.

    Returns:
        the same ``cfg``, for chaining.
    """
    _C = cfg
    _C.CAPTION = CN()
    # Training objective (coarse spec §5.6): "mle" (cross-entropy), "gold" (GOLD-weighted
    # cross-entropy against a frozen snapshot) or "cider" (0.3 * MLE + 0.7 * CIDEr-D REINFORCE).
    _C.CAPTION.STAGE = "mle"
    # Decoding at evaluation: "beam" (the original's length-normalised beam search, with which
    # released checkpoints were evaluated: a finished hypothesis ranked first ends the search),
    # "beam_complete" (every hypothesis searched to its end) or "greedy".
    _C.CAPTION.DECODING = "beam"
    _C.CAPTION.BEAM_SIZE = 5  # hypotheses kept per image (original: 5)
    # Longest caption in tokens, <s> included (original: max_text_len = 50, so <= 49 generated).
    _C.CAPTION.MAX_LENGTH = 50
    # Decode with cached keys/values (self-attention of the prefix, cross-attention of the image);
    # False re-encodes the whole prefix every step as the original does (same captions, slower).
    # The CIDEr stage samples in train mode and always re-encodes (dropout drawn anew each step).
    _C.CAPTION.USE_CACHE = True
    # GOLD: a frozen eval-mode snapshot of the model is taken every this many iterations (from 0).
    _C.CAPTION.GOLD_UPDATE_PERIOD = 1000
    _C.CAPTION.GOLD_MIN_WEIGHT = 0.1  # lower bound of a token weight
    # GOLD: divide each sequence's weighted loss by its number of PADDING label positions, as the
    # original code does (spec §5.6 flags it as a probable bug). Default False: divide by the number
    # of real (non-padding) label positions, the natural normaliser.
    _C.CAPTION.GOLD_ORIGINAL_DIVISOR = False
    _C.CAPTION.CIDER_ALPHA = 0.3  # CIDEr stage: loss = ALPHA * MLE + (1 - ALPHA) * RL
    _C.CAPTION.CIDER_SAMPLES = 5  # sampled captions per image for the RL term
    # Constant REINFORCE baseline in CIDEr-D units (original: 1.0, i.e. CIDEr 100).
    _C.CAPTION.CIDER_BASELINE = 1.0
    # Metrics of the evaluator; METEOR and SPICE need Java (SPICE also the Stanford CoreNLP jars)
    # and are listed as skipped when it is missing.
    _C.CAPTION.METRICS = ["BLEU", "CIDEr", "METEOR", "SPICE"]
    return cfg
