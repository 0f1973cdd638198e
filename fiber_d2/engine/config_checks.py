"""The checks of a config's values before a run writes anything (one :class:`ConfigError` line
naming the key): sizes the towers and the head cannot be built with, keys with a fixed set of values,
probabilities and ranges, and the run's schedule and loader settings. ``validate_config``
(:mod:`fiber_d2.engine.setup`) runs them with the checks of names, files and weights."""

from __future__ import annotations

from detectron2.config import CfgNode

from ..config import ConfigError
from ..data.prompts import parse_caption_prompt
from ..data.vl_transforms import VL_TRANSFORMS
from ..modeling.head.postprocess import SCORE_AGGREGATIONS
from ..modeling.meta_arch.coarse_heads import POOLINGS
from ..modeling.meta_arch.fiber_coarse import (
    ITM_NEGATIVE_SOURCES,
    QUEUE_INITS,
    FIBERCoarse,
    check_losses,
)
from .memory import check_mmap_threshold
from .optimizer import OPTIMIZERS, PARAM_GROUP_RULES
from .trainer import is_coarse_stage

__all__ = [
    "ConfigError",
    "CHOICES",
    "PROBABILITIES",
    "TRAINING_CHOICES",
    "TRAINING_PROBABILITIES",
    "check_coarse_settings",
    "check_model_sizes",
    "check_run_settings",
    "check_values",
    "config_value",
    "require_at_least_one",
]


def config_value(cfg: CfgNode, key: str):
    """The value of a dotted key (``"CAPTION.BEAM_SIZE"``)."""
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def require_at_least_one(cfg: CfgNode, *keys: str) -> None:
    """A :class:`ConfigError` naming the first of ``keys`` (dotted names, e.g.
    ``"CAPTION.BEAM_SIZE"``) whose value is below 1."""
    for key in keys:
        value = config_value(cfg, key)
        if value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")


def check_model_sizes(cfg: CfgNode) -> None:
    """Sizes the towers cannot be built or run with, as one-line errors (instead of a shape error
    deep in the first forward)."""
    text = cfg.MODEL.LANGUAGE_BACKBONE
    positions = text.MAX_POSITION_EMBEDDINGS - 2  # RoBERTa's positions start after the pad id
    if not 3 <= text.MAX_QUERY_LEN <= positions:
        raise ConfigError(
            f"MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN {text.MAX_QUERY_LEN} must be between 3 (<s>, "
            f"a token, </s>) and MAX_POSITION_EMBEDDINGS - 2 = {positions}"
        )
    fusion = cfg.MODEL.FIBER.NUM_FUSION_LAYERS
    if fusion > text.NUM_LAYERS:
        raise ConfigError(
            f"MODEL.FIBER.NUM_FUSION_LAYERS {fusion} is more than the text tower's "
            f"MODEL.LANGUAGE_BACKBONE.NUM_LAYERS {text.NUM_LAYERS}"
        )
    if fusion < 0:
        raise ConfigError(f"MODEL.FIBER.NUM_FUSION_LAYERS {fusion} must be >= 0")
    if text.HIDDEN_SIZE < 1 or text.NUM_HEADS < 1 or text.HIDDEN_SIZE % text.NUM_HEADS:
        raise ConfigError(
            f"MODEL.LANGUAGE_BACKBONE.HIDDEN_SIZE {text.HIDDEN_SIZE} must be a positive multiple of "
            f"NUM_HEADS {text.NUM_HEADS}"
        )
    for key in ("MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD"):
        if len(config_value(cfg, key)) != 3:
            raise ConfigError(
                f"{key} must have 3 values, one per channel of INPUT.FORMAT "
                f"{cfg.INPUT.FORMAT}, got {list(config_value(cfg, key))}"
            )
    _check_swin_sizes(cfg.MODEL.SWIN)
    if _is_image_text_model(cfg):
        return  # no FPN, head or anchors
    head = cfg.MODEL.DYHEAD
    if head.CHANNELS < 1 or head.NUM_GROUPS < 1 or head.CHANNELS % head.NUM_GROUPS:
        raise ConfigError(
            f"MODEL.DYHEAD.CHANNELS {head.CHANNELS} must be a positive multiple of NUM_GROUPS "
            f"{head.NUM_GROUPS} (GroupNorm)"
        )
    for key, least in (
        ("MODEL.DYHEAD.NUM_CONVS", 0),
        ("MODEL.DYHEAD.NUM_CLASSES", 2),  # sizes the frozen cls_logits conv: NUM_CLASSES - 1
        ("MODEL.FPN.OUT_CHANNELS", 1),
        ("MODEL.ATSS.TOPK", 1),
        ("TEST.DETECTIONS_PER_IMAGE", 1),
    ):
        if config_value(cfg, key) < least:
            raise ConfigError(f"{key} {config_value(cfg, key)} must be at least {least}")
    ours = cfg.MODEL.BACKBONE.NAME == "build_fiber_swin_roberta_fpn_backbone"
    produced = list(cfg.MODEL.SWIN.OUT_FEATURES)  # stage names (checked above)
    unknown = [f for f in cfg.MODEL.FPN.IN_FEATURES if f not in produced]
    if ours and unknown:
        raise ConfigError(
            f"MODEL.FPN.IN_FEATURES {unknown} are not outputs of the image tower "
            f"(MODEL.SWIN.OUT_FEATURES {produced})"
        )
    levels = len(cfg.MODEL.FPN.IN_FEATURES) + 2  # the FPN's inputs, then P6 and P7
    atss = cfg.MODEL.ATSS
    if not len(atss.ANCHOR_SIZES) == len(atss.ANCHOR_STRIDES) == levels:
        raise ConfigError(
            f"MODEL.ATSS.ANCHOR_SIZES {list(atss.ANCHOR_SIZES)} and ANCHOR_STRIDES "
            f"{list(atss.ANCHOR_STRIDES)} need one value per FPN level: {levels} "
            f"(MODEL.FPN.IN_FEATURES, then P6 and P7)"
        )
    if not ours:
        return  # another backbone: its own strides
    # res_k has stride PATCH_SIZE * 2**(k - 2); P6 and P7 halve the last input twice
    strides = [cfg.MODEL.SWIN.PATCH_SIZE * 2 ** (int(f[3:]) - 2) for f in cfg.MODEL.FPN.IN_FEATURES]
    strides += [strides[-1] * 2, strides[-1] * 4]
    if list(atss.ANCHOR_STRIDES) != strides:
        raise ConfigError(
            f"MODEL.ATSS.ANCHOR_STRIDES {list(atss.ANCHOR_STRIDES)} must be the strides of the FPN "
            f"levels, finest first: {strides} (MODEL.FPN.IN_FEATURES "
            f"{list(cfg.MODEL.FPN.IN_FEATURES)} with MODEL.SWIN.PATCH_SIZE {cfg.MODEL.SWIN.PATCH_SIZE}, "
            "then P6 and P7)"
        )


def _is_image_text_model(cfg: CfgNode) -> bool:
    """Whether the meta architecture is the coarse model or built on it (VQA, NLVR2, captioning,
    retrieval): those read no FPN, head or anchor settings."""
    from detectron2.modeling import META_ARCH_REGISTRY

    arch = cfg.MODEL.META_ARCHITECTURE
    if arch not in META_ARCH_REGISTRY:
        return is_coarse_stage(cfg)
    model_class = META_ARCH_REGISTRY.get(arch)
    return isinstance(model_class, type) and issubclass(model_class, FIBERCoarse)


def _check_swin_sizes(swin: CfgNode) -> None:
    """``MODEL.SWIN``'s sizes as one-line errors (they failed in timm's or our build)."""
    stages = len(swin.DEPTHS)
    for key in ("PATCH_SIZE", "EMBED_DIM", "WINDOW_SIZE"):
        if swin[key] < 1:
            raise ConfigError(f"MODEL.SWIN.{key} {swin[key]} must be at least 1")
    if not stages or min(swin.DEPTHS) < 1:
        raise ConfigError(f"MODEL.SWIN.DEPTHS {list(swin.DEPTHS)} must be blocks per stage, >= 1")
    if len(swin.NUM_HEADS) != stages or len(swin.OUT_NORM) != stages:
        raise ConfigError(
            f"MODEL.SWIN.NUM_HEADS {list(swin.NUM_HEADS)} and OUT_NORM {list(swin.OUT_NORM)} need "
            f"one value per stage of DEPTHS {list(swin.DEPTHS)}"
        )
    for i, heads in enumerate(swin.NUM_HEADS):
        width = swin.EMBED_DIM * 2**i
        if heads < 1 or width % heads:
            raise ConfigError(
                f"MODEL.SWIN.NUM_HEADS[{i}] {heads} must divide stage {i + 1}'s width {width} "
                "(EMBED_DIM x 2 per stage)"
            )
    names = [f"res{i + 2}" for i in range(stages)]
    unknown = [f for f in swin.OUT_FEATURES if f not in names]
    if unknown:
        raise ConfigError(
            f"MODEL.SWIN.OUT_FEATURES {unknown} are not stage outputs; this Swin has {names}"
        )


# Keys with a fixed set of values (compared as given; SOLVER.OPTIMIZER in any case), and keys that are
# probabilities: checked before a run writes anything. Each was otherwise refused only when the model,
# the optimizer or a batch was built (MODEL.DYHEAD.SCORE_AGG: after a whole training run, by its final
# evaluation), with messages that did not always name the key, or silently accepted.
CHOICES = {
    "MODEL.DYHEAD.SCORE_AGG": SCORE_AGGREGATIONS,
    "INPUT.FORMAT": ("BGR", "RGB"),
    "TEST.AMP_DTYPE": ("bfloat16", "float16"),
    "TEST.FLICKR_GT_TYPE": ("separate", "merged"),
    "MODEL.COARSE.QUEUE_INIT": QUEUE_INITS,
    "MODEL.COARSE.ITM_NEGATIVES": ITM_NEGATIVE_SOURCES,
    "MODEL.COARSE.ITC_TEXT_POOL": POOLINGS,
}
TRAINING_CHOICES = {
    "INPUT.MIN_SIZE_TRAIN_SAMPLING": ("choice", "range"),
    "SOLVER.OPTIMIZER": OPTIMIZERS,
    "SOLVER.PARAM_GROUP_RULE": PARAM_GROUP_RULES,
    "SOLVER.LR_SCHEDULER_NAME": (
        "WarmupMultiStepLR",
        "WarmupCosineLR",
        "WarmupStepWithFixedGammaLR",
        "WarmupLinearDecayLR",
    ),
    "SOLVER.WARMUP_METHOD": ("linear", "constant"),
    "INPUT.VL_TRAIN_TRANSFORM": VL_TRANSFORMS,
}
PROBABILITIES = ("MODEL.ATSS.INFERENCE_TH", "MODEL.ATSS.NMS_TH")
TRAINING_PROBABILITIES = (
    "INPUT.FLIP_PROB",
    "INPUT.CAPTION_FLIP_PROB",
    "MODEL.FPN.DROP_BLOCK_PROB",
    "MODEL.COARSE.MLM_PROBABILITY",
    "SOLVER.EMA.DECAY",
    "SOLVER.WEIGHT_DECAY_SCHEDULE_RATIO",
    "SOLVER.MAX_NEG_PER_BATCH",
)


def check_coarse_settings(coarse: CfgNode) -> None:
    """``MODEL.COARSE.LOSSES`` names known objectives, each with one ``LOSS_WEIGHTS`` entry; the
    ITC queue holds at least one sample and the temperature starts inside its clamp."""
    if coarse.QUEUE_SIZE < 1:
        raise ConfigError(f"MODEL.COARSE.QUEUE_SIZE {coarse.QUEUE_SIZE} must be at least 1")
    if not 0.0 < coarse.TEMPERATURE <= 1.0:
        raise ConfigError(
            f"MODEL.COARSE.TEMPERATURE {coarse.TEMPERATURE} must be in (0, 1] (the learnt "
            "temperature is clamped to [0.001, 1])"
        )
    check_losses(coarse.LOSSES, coarse.LOSS_WEIGHTS)


def check_values(cfg: CfgNode, *, training: bool) -> None:
    """:data:`CHOICES` and :data:`PROBABILITIES` (and their training-only tables), the test size,
    and the prompt-sampling settings of training."""
    choices = {**CHOICES, **(TRAINING_CHOICES if training else {})}
    for key, allowed in choices.items():
        value = config_value(cfg, key)
        given = value.upper() if key == "SOLVER.OPTIMIZER" and isinstance(value, str) else value
        if given not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")
    for key in PROBABILITIES + (TRAINING_PROBABILITIES if training else ()):
        value = config_value(cfg, key)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{key} must be between 0 and 1, got {value}")
    swin = cfg.MODEL.SWIN
    divisor = swin.PATCH_SIZE * 2 ** (len(swin.DEPTHS) - 1)
    if is_coarse_stage(cfg) and (
        cfg.INPUT.IMAGE_SIZE < 1 or cfg.INPUT.IMAGE_SIZE % max(divisor, 1)
    ):
        raise ConfigError(
            f"INPUT.IMAGE_SIZE {cfg.INPUT.IMAGE_SIZE} must be a positive multiple of {divisor} "
            "(MODEL.SWIN.PATCH_SIZE, then an even map for every patch merging)"
        )
    if not cfg.DATASETS.SEPARATION_TOKENS:
        raise ConfigError("DATASETS.SEPARATION_TOKENS is empty: category names would run together")
    if cfg.INPUT.MAX_SIZE_TEST < 1:
        raise ConfigError(f"INPUT.MAX_SIZE_TEST {cfg.INPUT.MAX_SIZE_TEST} must be a positive size")
    if cfg.TEST.CHUNK_BATCH_SIZE < 1:
        raise ConfigError(f"TEST.CHUNK_BATCH_SIZE must be >= 1, got {cfg.TEST.CHUNK_BATCH_SIZE}")
    check_coarse_settings(cfg.MODEL.COARSE)
    parse_caption_prompt(cfg.DATASETS.CAPTION_PROMPT)  # ConfigError on a malformed literal
    if not training:
        return
    coarse = cfg.MODEL.COARSE
    if is_coarse_stage(cfg) and "mlm" in coarse.LOSSES and coarse.MLM_PROBABILITY <= 0:
        raise ConfigError(
            f"MODEL.COARSE.MLM_PROBABILITY {coarse.MLM_PROBABILITY} masks no token for the 'mlm' "
            "objective of MODEL.COARSE.LOSSES: raise it, or drop 'mlm' from LOSSES and LOSS_WEIGHTS"
        )
    if cfg.INPUT.MAX_SIZE_TRAIN < 1:
        raise ConfigError(
            f"INPUT.MAX_SIZE_TRAIN {cfg.INPUT.MAX_SIZE_TRAIN} must be a positive size"
        )
    alpha = cfg.MODEL.DYHEAD.TOKEN_ALPHA  # torchvision's focal loss: -1 turns the weighting off
    if alpha != -1 and not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"MODEL.DYHEAD.TOKEN_ALPHA must be between 0 and 1 (or -1), got {alpha}")
    betas = tuple(cfg.SOLVER.BETAS)
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError(f"SOLVER.BETAS must be two values in [0, 1), got {betas}")
    control = tuple(cfg.DATASETS.CONTROL_PROB)
    if len(control) != 4 or min(control) < 0 or sum(control) > 1.0 + 1e-6:
        raise ConfigError(
            "DATASETS.CONTROL_PROB must be 4 probabilities (>= 0, summing to at most 1), got "
            f"{control}"
        )
    if cfg.DATASETS.RANDOM_SAMPLE_NEG < 0:
        raise ConfigError(
            f"DATASETS.RANDOM_SAMPLE_NEG {cfg.DATASETS.RANDOM_SAMPLE_NEG} must be >= 0"
        )


def check_run_settings(cfg: CfgNode, *, training: bool) -> None:
    """Settings detectron2 or torch would reject with a traceback after the run has started."""
    from detectron2.modeling import META_ARCH_REGISTRY

    arch = cfg.MODEL.META_ARCHITECTURE
    if arch not in META_ARCH_REGISTRY:
        known = ", ".join(sorted(name for name, _ in META_ARCH_REGISTRY))
        raise ConfigError(f"MODEL.META_ARCHITECTURE {arch!r} is not registered; known: {known}")
    if cfg.DATALOADER.NUM_WORKERS < 0:
        raise ConfigError(f"DATALOADER.NUM_WORKERS {cfg.DATALOADER.NUM_WORKERS} must be >= 0")
    if min(cfg.INPUT.MIN_SIZE_TRAIN, default=1) < 1 or cfg.INPUT.MIN_SIZE_TEST < 0:
        raise ConfigError(
            f"INPUT.MIN_SIZE_TRAIN {tuple(cfg.INPUT.MIN_SIZE_TRAIN)} and INPUT.MIN_SIZE_TEST "
            f"{cfg.INPUT.MIN_SIZE_TEST}: training sizes must be >= 1, the test size >= 0 (0: test "
            "images at their own size)"
        )
    check_values(cfg, training=training)
    if not training:
        return
    try:
        check_mmap_threshold(cfg.CPU_MMAP_THRESHOLD_MB)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    s = cfg.SOLVER
    if s.CHECKPOINT_PERIOD < 1:
        raise ConfigError(f"SOLVER.CHECKPOINT_PERIOD {s.CHECKPOINT_PERIOD} must be at least 1")
    if s.BASE_LR < 0:
        raise ConfigError(f"SOLVER.BASE_LR {s.BASE_LR} must be >= 0")
    steps = list(s.STEPS)
    if any(b <= a for a, b in zip(steps, steps[1:])) or any(x < 0 for x in steps):
        raise ConfigError(f"SOLVER.STEPS {tuple(steps)} must be increasing iterations")
