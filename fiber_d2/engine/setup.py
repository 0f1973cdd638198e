"""Config loading and validation for the command-line tools (train_net, demo, benchmark, analyze_model).

Every user mistake that can be caught before a run starts (missing or misspelled config file or key,
unregistered dataset, missing weights) raises :class:`ConfigError` with one line naming the culprit, before
anything is written to ``OUTPUT_DIR``.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import yaml
from detectron2.config import CfgNode, get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils import comm
from detectron2.utils.logger import log_first_n

from ..checkpoint.checkpointer import META_COPY_WARNING
from ..checkpoint.safe_io import one_line
from ..config import add_fiber_config
from ..model_zoo.weights import repo_root
from ..text import build_tokenizer
from .memory import check_mmap_threshold
from .train_step import accumulation_steps
from .trainer import is_coarse_stage

__all__ = [
    "ConfigError",
    "check_device_available",
    "check_tokenizer_available",
    "check_tower_weights_available",
    "load_config",
    "require_at_least_one",
    "resolve_config_file",
    "register_config_datasets",
    "validate_config",
    "tool_image_size",
]

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A one-line, user-facing configuration error."""


def load_config(
    config_file: str | None,
    opts: list[str] | None = None,
    *,
    extra_defaults: Sequence[Callable[[CfgNode], CfgNode]] = (),
) -> CfgNode:
    """Build a detectron2 config with fiber_d2's defaults, a yaml file and ``KEY VALUE`` overrides.

    Args:
        config_file: path of a yaml (``_BASE_`` inheritance allowed), or None/"" for the defaults.
        opts: flat list ``[KEY, VALUE, KEY, VALUE, ...]``.
        extra_defaults: functions adding a project's keys (e.g. ``add_retrieval_config``), applied
            after :func:`add_fiber_config`.

    Returns:
        the merged (not yet frozen) config.

    Raises:
        ConfigError: missing file, unknown key, malformed overrides.
    """
    cfg = add_fiber_config(get_cfg())
    for add_defaults in extra_defaults:
        cfg = add_defaults(cfg)
    if config_file:
        config_file = resolve_config_file(config_file)
        try:
            _merge_file(cfg, config_file)
        except KeyError as e:
            raise ConfigError(f"{config_file}: {_key_error_text(e)}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{config_file}: {_yaml_error_text(e)}") from None
        except OSError as e:  # a _BASE_ that is not there (read relative to the file naming it)
            raise ConfigError(f"{config_file}: cannot read {e.filename}: {e.strerror}") from None
        except (ValueError, TypeError, AssertionError) as e:  # a value of the wrong type
            raise ConfigError(f"{config_file}: {' '.join(str(e).split())}") from None
    opts = list(opts or [])
    if len(opts) % 2:
        raise ConfigError(f"overrides must be KEY VALUE pairs, got an odd list: {opts}")
    try:
        cfg.merge_from_list(opts)
    except (KeyError, AssertionError) as e:
        raise ConfigError(f"command-line override: {_key_error_text(e)}") from None
    except ValueError as e:
        raise ConfigError(f"command-line override: {e}") from None
    register_config_datasets(cfg)
    return cfg


def _yaml_error_text(e: yaml.YAMLError) -> str:
    """A YAML syntax error in one line: what, and where (file, line, column)."""
    mark = getattr(e, "problem_mark", None)
    where = f" at {mark.name}, line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(e, "problem", None) or type(e).__name__
    return f"not valid YAML: {problem}{where}"


def resolve_config_file(config_file: str) -> str:
    """A config path as given, or relative to the repository (``configs/...`` from any directory),
    or a model-zoo name (``demo``, ``fiber-b/coco``).

    Raises:
        ConfigError: none of these exists.
    """
    path = os.path.expanduser(config_file)
    if os.path.isfile(path):
        return path
    packaged = repo_root() / config_file
    if not os.path.isabs(config_file) and packaged.is_file():
        return str(packaged)
    from .. import model_zoo

    if config_file in model_zoo.names():
        return str(model_zoo.config_path(config_file))
    raise ConfigError(f"config file not found: {config_file}")


def _check_sections(data, node: CfgNode, prefix: str = "") -> None:
    """A yaml mapping whose keys that are sections in the defaults (``MODEL``, ``MODEL.SWIN``, ...)
    are mappings too; detectron2's merge fails on anything else with a bare TypeError.

    Raises:
        ValueError: one line naming the key.
    """
    if not isinstance(data, dict):
        what = f"{prefix.rstrip('.')} is a section of keys" if prefix else "the top level is keys"
        raise ValueError(f"{what} (KEY: value lines), not {type(data).__name__} {data!r}")
    for key, value in data.items():
        default = node.get(key)
        if isinstance(default, CfgNode):
            _check_sections(value, default, f"{prefix}{key}.")


def _merge_file(cfg: CfgNode, config_file: str, chain: tuple[str, ...] = ()) -> None:
    """``merge_from_file`` with every ``_BASE_`` resolved at every level: beside the file naming it,
    else as a repository config (``_BASE_: "configs/Demo/fine_tiny.yaml"`` in a user's yaml
    anywhere, or in a yaml based on that one).

    Raises:
        FileNotFoundError: a ``_BASE_`` found neither way (its ``filename`` names the file asking).
        ValueError: a ``_BASE_`` that is not a file name, or a cycle of them.
    """
    here = str(Path(config_file).resolve())
    if here in chain:
        raise ValueError("_BASE_ cycle: " + " -> ".join([*chain, here]))
    with open(config_file) as f:
        data = yaml.safe_load(f) or {}
    _check_sections(data, cfg)
    base = data.pop("_BASE_", None)
    if base is None:
        cfg.merge_from_file(config_file)
        return
    if not isinstance(base, str) or not base:
        raise ValueError(f"_BASE_ must be a yaml file name, got {base!r}")
    beside = Path(config_file).resolve().parent / os.path.expanduser(base)
    packaged = repo_root() / base
    if not beside.is_file() and not os.path.isabs(base) and packaged.is_file():
        beside = packaged
    if not beside.is_file():
        raise FileNotFoundError(
            2, "No such file or directory", f"{base} (the _BASE_ of {config_file})"
        )
    _merge_file(cfg, str(beside), (*chain, here))
    cfg.merge_from_other_cfg(CfgNode(data))


def register_config_datasets(cfg: CfgNode, *, check_files: bool = False) -> list[str]:
    """Register the COCO-format sets listed in ``DATASETS.REGISTER`` (see fiber_d2/config.py).

    Each entry is ``[name, json_file, image_root]`` or ``[name, json_file, image_root, prompts]``
    with ``prompts`` a ``{category name: prompt text}`` override. Registering the same entry twice
    is a no-op; a name registered by an earlier config is replaced, any other registered name is
    an error. Files are read only when a dataset is first used; ``check_files`` (done by
    :func:`validate_config` before a run) checks that they exist.

    Returns:
        the names registered or already present.

    Raises:
        ConfigError: a malformed entry, a missing file or folder, a name taken by another dataset.
    """
    from ..data.datasets import register_grounding_coco

    names = []
    for i, item in enumerate(cfg.DATASETS.REGISTER):
        where = f"DATASETS.REGISTER[{i}]"
        if not isinstance(item, (list, tuple)) or len(item) not in (3, 4):
            raise ConfigError(
                f"{where} must be [name, json_file, image_root] or [..., {{category: prompt}}], "
                f"got {item!r}"
            )
        name, json_file, image_root = (str(v) for v in item[:3])
        prompts = item[3] if len(item) == 4 else None
        if prompts is not None and not (
            isinstance(prompts, dict) and all(isinstance(v, str) for v in prompts.values())
        ):
            raise ConfigError(f"{where} ({name}): the prompt override must map names to text")
        json_file, image_root = os.path.expanduser(json_file), os.path.expanduser(image_root)
        if check_files and not os.path.isfile(json_file):
            raise ConfigError(f"{where} ({name}): annotation file not found: {json_file}")
        if check_files and not os.path.isdir(image_root):
            raise ConfigError(f"{where} ({name}): image folder not found: {image_root}")
        json_file, image_root = os.path.abspath(json_file), os.path.abspath(image_root)
        if name in DatasetCatalog.list():
            meta = MetadataCatalog.get(name)
            if meta.get("json_file", None) == json_file and dict(
                meta.get("category_prompts", {}) or {}
            ) == dict(prompts or {}):
                names.append(name)
                continue
            if not meta.get("registered_by_config", False):
                raise ConfigError(
                    f"{where}: dataset name {name!r} is already registered (with "
                    f"{meta.get('json_file', 'another loader')}); choose another name"
                )
            # a name from an earlier config (another working directory, other files): replace it
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_grounding_coco(name, json_file, image_root, prompt=prompts)
        MetadataCatalog.get(name).set(registered_by_config=True)
        names.append(name)
        logger.debug("registered %s from %s", name, json_file)
    return names


def _key_error_text(e: Exception) -> str:
    text = e.args[0] if e.args else str(e)
    return f"{text} (check the spelling against fiber_d2/config.py)"


def check_device_available(device: str | None, name: str) -> None:
    """A CUDA ``device`` on a machine without one is one :class:`ConfigError` line naming it
    (``name``, e.g. "MODEL.DEVICE cuda"), not the driver's error at the first ``.to()``."""
    if device is None:
        return
    try:
        torch.device(str(device))
    except (RuntimeError, ValueError):
        raise ConfigError(f"{name}: not a torch device (cpu, cuda, cuda:N, ...)") from None
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{name}: no CUDA device is available here; use cpu")


def _value(cfg: CfgNode, key: str):
    """The value of a dotted key (``"CAPTION.BEAM_SIZE"``)."""
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def require_at_least_one(cfg: CfgNode, *keys: str) -> None:
    """A :class:`ConfigError` naming the first of ``keys`` (dotted names, e.g.
    ``"CAPTION.BEAM_SIZE"``) whose value is below 1."""
    for key in keys:
        value = _value(cfg, key)
        if value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")


def _check_model_sizes(cfg: CfgNode) -> None:
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
        if len(_value(cfg, key)) != 3:
            raise ConfigError(f"{key} must have 3 values (B, G, R), got {list(_value(cfg, key))}")
    _check_swin_sizes(cfg.MODEL.SWIN)
    if is_coarse_stage(cfg):
        return
    head = cfg.MODEL.DYHEAD
    if head.CHANNELS < 1 or head.NUM_GROUPS < 1 or head.CHANNELS % head.NUM_GROUPS:
        raise ConfigError(
            f"MODEL.DYHEAD.CHANNELS {head.CHANNELS} must be a positive multiple of NUM_GROUPS "
            f"{head.NUM_GROUPS} (GroupNorm)"
        )
    levels = len(cfg.MODEL.FPN.IN_FEATURES) + 2  # the FPN's inputs, then P6 and P7
    atss = cfg.MODEL.ATSS
    if not len(atss.ANCHOR_SIZES) == len(atss.ANCHOR_STRIDES) == levels:
        raise ConfigError(
            f"MODEL.ATSS.ANCHOR_SIZES {list(atss.ANCHOR_SIZES)} and ANCHOR_STRIDES "
            f"{list(atss.ANCHOR_STRIDES)} need one value per FPN level: {levels} "
            f"(MODEL.FPN.IN_FEATURES, then P6 and P7)"
        )


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
    "MODEL.DYHEAD.SCORE_AGG": ("MEAN", "MAX"),
    "INPUT.FORMAT": ("BGR", "RGB"),
    "TEST.AMP_DTYPE": ("bfloat16", "float16"),
    "TEST.FLICKR_GT_TYPE": ("separate", "merged"),
}
TRAINING_CHOICES = {
    "INPUT.MIN_SIZE_TRAIN_SAMPLING": ("choice", "range"),
    "SOLVER.OPTIMIZER": ("ADAMW", "SGD"),
    "SOLVER.PARAM_GROUP_RULE": ("fine", "coarse"),
    "SOLVER.LR_SCHEDULER_NAME": (
        "WarmupMultiStepLR",
        "WarmupCosineLR",
        "WarmupStepWithFixedGammaLR",
        "WarmupLinearDecayLR",
    ),
    "SOLVER.WARMUP_METHOD": ("linear", "constant"),
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


def _check_values(cfg: CfgNode, *, training: bool) -> None:
    """:data:`CHOICES` and :data:`PROBABILITIES` (and their training-only tables), the test size,
    and the prompt-sampling settings of training."""
    choices = {**CHOICES, **(TRAINING_CHOICES if training else {})}
    for key, allowed in choices.items():
        value = _value(cfg, key)
        given = value.upper() if key == "SOLVER.OPTIMIZER" and isinstance(value, str) else value
        if given not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")
    for key in PROBABILITIES + (TRAINING_PROBABILITIES if training else ()):
        value = _value(cfg, key)
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
    if not training:
        return
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


def _check_run_settings(cfg: CfgNode, *, training: bool) -> None:
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
            f"{cfg.INPUT.MIN_SIZE_TEST} must be positive sizes"
        )
    _check_values(cfg, training=training)
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


def check_tokenizer_available(cfg: CfgNode) -> None:
    """The configured tokenizer loads (a hub name needs network or the hub cache), as one
    :class:`ConfigError` line instead of a traceback from the first mapper."""
    try:
        build_tokenizer(cfg.MODEL.LANGUAGE_BACKBONE.TOKENIZER)
    except (OSError, ValueError) as e:
        raise ConfigError(f"MODEL.LANGUAGE_BACKBONE.TOKENIZER: {e}") from None


def check_tower_weights_available(cfg: CfgNode) -> None:
    """The towers' own pretrained weights load and fit, checked before the run writes anything
    (the model's build reads them only after ``config.yaml`` and ``log.txt`` are written).

    ``MODEL.SWIN.WEIGHTS`` is read safely and loaded into an image tower built on the meta device
    (keys and shapes only); ``MODEL.LANGUAGE_BACKBONE.WEIGHTS`` must name a loadable RoBERTa config
    (a local directory, or a hub name in the hub cache when offline) of the configured sizes, with
    the random-init-only keys at their defaults.

    Raises:
        ConfigError, CheckpointError: one line naming the key and the file.
    """
    lang = cfg.MODEL.LANGUAGE_BACKBONE
    if lang.WEIGHTS:
        from ..modeling.backbone.roberta import RANDOM_INIT_DEFAULTS

        for name, default in RANDOM_INIT_DEFAULTS.items():
            key = name.upper()  # the config key of the tower's argument
            if lang[key] != default:
                raise ConfigError(
                    f"MODEL.LANGUAGE_BACKBONE.{key} {lang[key]} applies to a random init only; "
                    f"MODEL.LANGUAGE_BACKBONE.WEIGHTS {lang.WEIGHTS!r} are loaded as they are "
                    f"(set it to {default})"
                )
        from transformers import AutoConfig

        if lang.WEIGHTS.startswith(("/", ".", "~")) and not os.path.isdir(lang.WEIGHTS):
            raise ConfigError(
                f"MODEL.LANGUAGE_BACKBONE.WEIGHTS {lang.WEIGHTS!r}: no such directory (a local "
                f"save_pretrained directory or a hub name)"
            )
        try:
            text_config = AutoConfig.from_pretrained(lang.WEIGHTS)
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"MODEL.LANGUAGE_BACKBONE.WEIGHTS {lang.WEIGHTS!r} cannot be loaded: {one_line(e)}"
            ) from None
        got = (text_config.hidden_size, text_config.num_hidden_layers)
        if got != (lang.HIDDEN_SIZE, lang.NUM_LAYERS):
            raise ConfigError(
                f"MODEL.LANGUAGE_BACKBONE.WEIGHTS {lang.WEIGHTS!r} have (hidden, layers) = {got}; "
                f"MODEL.LANGUAGE_BACKBONE.HIDDEN_SIZE / NUM_LAYERS ask for "
                f"{(lang.HIDDEN_SIZE, lang.NUM_LAYERS)}"
            )
    if cfg.MODEL.SWIN.WEIGHTS:
        from ..modeling.backbone.swin import SwinImageTower

        with torch.device("meta"):
            tower = SwinImageTower(cfg, weights="")
        with warnings.catch_warnings():
            # copying into meta tensors is a no-op by design (keys and shapes are what is checked)
            warnings.filterwarnings("ignore", message=META_COPY_WARNING, category=UserWarning)
            tower.load_imagenet_checkpoint(cfg.MODEL.SWIN.WEIGHTS)


def validate_config(cfg: CfgNode, *, training: bool) -> None:
    """Check names and paths the run will need, before it writes anything.

    Raises:
        ConfigError: an unregistered dataset, a missing local weights file, a text length or
            fusion depth the towers cannot have, an empty or indivisible batch, no training size,
            or a batch too small for the batch standardisation of ``cls_feats``.
    """
    names = list(cfg.DATASETS.TEST)
    if training:
        names += list(cfg.DATASETS.TRAIN)
    register_config_datasets(cfg, check_files=True)
    registered = set(DatasetCatalog.list())
    for name in names:
        if name not in registered:
            raise ConfigError(
                f"dataset '{name}' is not registered; register it (see README 'Datasets') "
                f"or pick one of fiber_d2's: {', '.join(sorted(n for n in registered if 'shapes' in n))}"
            )
    weights = cfg.MODEL.WEIGHTS
    if weights and "://" not in weights and not os.path.isfile(weights):
        raise ConfigError(f"MODEL.WEIGHTS file not found: {weights}")
    if cfg.MODEL.SWIN.WEIGHTS and not os.path.isfile(cfg.MODEL.SWIN.WEIGHTS):
        raise ConfigError(f"MODEL.SWIN.WEIGHTS file not found: {cfg.MODEL.SWIN.WEIGHTS}")
    _check_model_sizes(cfg)
    batch, processes = cfg.SOLVER.IMS_PER_BATCH, comm.get_world_size()
    if training and (batch < 1 or batch % processes):
        raise ConfigError(
            f"SOLVER.IMS_PER_BATCH {batch} must be a positive multiple of the number of "
            f"processes ({processes})"
        )
    if training and not cfg.INPUT.MIN_SIZE_TRAIN:
        raise ConfigError("INPUT.MIN_SIZE_TRAIN is empty: name at least one training size")
    _check_run_settings(cfg, training=training)
    if cfg.TEST.UNREADABLE_IMAGE_AS_EMPTY:
        from ..data.datasets.common import (
            UNREADABLE_AS_EMPTY_EVALUATORS,
            counts_unreadable_as_empty,
        )

        for name in cfg.DATASETS.TEST:
            if not counts_unreadable_as_empty(name):
                kind = MetadataCatalog.get(name).get("evaluator_type", None)
                raise ConfigError(
                    f"TEST.UNREADABLE_IMAGE_AS_EMPTY applies to the evaluators "
                    f"{', '.join(UNREADABLE_AS_EMPTY_EVALUATORS)}; test dataset '{name}' "
                    f"(evaluator {kind!r}) evaluates every image: fix or drop the unreadable ones"
                )
    passes = accumulation_steps(cfg, processes) if training else 1
    s = cfg.SOLVER
    if training and s.MAX_EPOCHS > 0 and s.MAX_ITER != 0:
        raise ConfigError(
            f"SOLVER.MAX_EPOCHS {s.MAX_EPOCHS} and SOLVER.MAX_ITER {s.MAX_ITER} are both set: "
            "MAX_ITER 0 counts the schedule in epochs, MAX_EPOCHS 0 trains MAX_ITER iterations"
        )
    if training and s.MAX_EPOCHS == 0 and s.MAX_ITER < 1:
        raise ConfigError(
            f"SOLVER.MAX_ITER {s.MAX_ITER}: give the iterations, or SOLVER.MAX_EPOCHS to count them"
        )
    if s.MAX_EPOCHS < 0 or not 0 <= s.WARMUP_FRACTION < 1:
        raise ConfigError(
            f"SOLVER.MAX_EPOCHS {s.MAX_EPOCHS} must be >= 0 and SOLVER.WARMUP_FRACTION "
            f"{s.WARMUP_FRACTION} in [0, 1)"
        )
    fractions = list(s.STEP_FRACTIONS)
    if fractions != sorted(fractions) or any(not 0 < f < 1 for f in fractions):
        raise ConfigError(
            f"SOLVER.STEP_FRACTIONS {tuple(s.STEP_FRACTIONS)}: increasing fractions of MAX_ITER "
            "in (0, 1)"
        )
    if training and cfg.MODEL.COARSE.CLS_BATCH_NORM and batch // processes // passes < 2:
        raise ConfigError(
            "MODEL.COARSE.CLS_BATCH_NORM standardises cls_feats over each process's pass: "
            f"SOLVER.IMS_PER_BATCH {batch} over {processes} process(es) in {passes} pass(es) "
            f"gives {batch // processes // passes}; it needs at least 2 per pass"
        )
    if cfg.MODEL.DEVICE == "cpu" and cfg.SOLVER.AMP.ENABLED:
        # detectron2's AMPTrainer needs CUDA; FIBER's AMP recipes still run (in fp32) on the CPU.
        if training:  # said once, although a command line validates its config twice
            log_first_n(
                logging.WARNING, "SOLVER.AMP.ENABLED is ignored on the CPU; training in fp32.",
                key="message", name=logger.name,
            )  # fmt: skip
        was_frozen = cfg.is_frozen()
        cfg.defrost()
        cfg.SOLVER.AMP.ENABLED = False
        if was_frozen:
            cfg.freeze()


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure: torch's ``OutOfMemoryError`` (an accelerator) or
    the CPU allocator's ``RuntimeError`` ("can't allocate memory")."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error)
    )


def tool_image_size(
    cfg: CfgNode, height: int | None = None, width: int | None = None
) -> tuple[int, int]:
    """(H, W) of the synthetic images of the benchmark and analysis tools.

    Args:
        cfg: the config; its stage gives the default (coarse: ``INPUT.IMAGE_SIZE`` square,
            fine: ``INPUT.MIN_SIZE_TEST`` x ``INPUT.MAX_SIZE_TEST``).
        height, width: explicit sizes (``--height`` / ``--width``); None takes the default.

    Raises:
        ValueError: a non-positive size.
    """
    if is_coarse_stage(cfg):
        default = (cfg.INPUT.IMAGE_SIZE, cfg.INPUT.IMAGE_SIZE)
    else:
        default = (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    height = default[0] if height is None else height  # 0 is a size given, and refused
    width = default[1] if width is None else width
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got --height {height} --width {width}")
    return height, width
