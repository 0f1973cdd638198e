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
from .config_checks import (
    ConfigError,
    check_model_sizes,
    check_run_settings,
    require_at_least_one,
)
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
    check_model_sizes(cfg)
    batch, processes = cfg.SOLVER.IMS_PER_BATCH, comm.get_world_size()
    if training and (batch < 1 or batch % processes):
        raise ConfigError(
            f"SOLVER.IMS_PER_BATCH {batch} must be a positive multiple of the number of "
            f"processes ({processes})"
        )
    if training and not cfg.INPUT.MIN_SIZE_TRAIN:
        raise ConfigError("INPUT.MIN_SIZE_TRAIN is empty: name at least one training size")
    check_run_settings(cfg, training=training)
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
