#!/usr/bin/env python
"""Convert a released FIBER checkpoint (fine-grained .pth or coarse-grained Lightning .ckpt) to fiber_d2.

    python tools/convert_fiber_checkpoint.py --input fiber_coarse_then_fine.pth --output fiber_d2.pth \\
        --config-file configs/FIBER-B/coco.yaml
    python tools/convert_fiber_checkpoint.py --input fiber_pretrain.ckpt --output coarse_d2.pth \\
        --stage coarse --target coarse --config-file configs/FIBER-B/coarse_pretrain.yaml
    python tools/convert_fiber_checkpoint.py --input fiber_coco_caption.ckpt --output caption_d2.pth \\
        --target caption
    python tools/convert_fiber_checkpoint.py --input fiber_vqa.ckpt --output vqa_d2.pth \\
        --project VQA --config-file projects/VQA/configs/vqav2.yaml

``--stage`` (default: detected from the key names) names the original layout; ``--target`` (coarse stage
only) picks ``FIBERCoarse`` ("coarse") or the detector's fused backbone ("fine"); with a config it
defaults to the config's meta-architecture. ``--target caption`` converts a caption checkpoint
(``fiber_coco_caption.ckpt``) for ``projects/Captioning``'s ``FIBERCaption`` (adapters
``cross_modal_att_layers.*`` kept); it takes no config (the checkpoint is already at the caption
resolution, 576). With ``--config-file`` the fiber_d2 model is built on the meta
device (no memory for weights) to check shapes, resize relative-position tables and report missing keys.
``--project VQA`` (or ``NLVR2``...) loads a ``projects/<name>`` config (its package registers the
task model and adds its config keys); a released task checkpoint (``fiber_vqa.ckpt``,
``fiber_nlvr2.ckpt``) then keeps its head.
The input is read with ``torch.load(weights_only=True)`` (or safetensors / the numpy-only ``.pkl``
reader). The output is ``{"model": state_dict, "__fiber_d2__": provenance}`` (``.safetensors``
output: the state dict, provenance in the metadata), ready for ``MODEL.WEIGHTS``.
``FIBERCheckpointer`` runs the same conversion (:func:`fiber_d2.checkpoint.layout.convert_original`)
when an original file is given as ``MODEL.WEIGHTS`` directly.

The tool exits non-zero, writing nothing, when no tensor is mapped, when a tensor's shape differs
from the target model's (with ``--config-file``), or when the input is already a fiber_d2 file.
"""

import argparse
import importlib
import logging
import os
import sys

import torch

try:
    # first: registers FIBER's components and quiets fvcore's import-time TorchScript warning
    import fiber_d2  # noqa: F401
except ImportError as e:  # pragma: no cover
    sys.exit(
        f"error: detectron2 is not importable ({e}); run `make test` or see README 'Troubleshooting the detectron2 install'."
    )
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger

from fiber_d2.checkpoint.convert import convert_caption_state_dict, unwrap_state_dict
from fiber_d2.checkpoint.layout import (
    META_ARCH_TARGET,
    convert_original,
    fiber_d2_layout,
    original_layout,
)
from fiber_d2.checkpoint.safe_io import (
    CheckpointError,
    load_checkpoint_file,
    save_checkpoint_file,
    torch_load_error,
)
from fiber_d2.engine.cli import check_output_file
from fiber_d2.engine.setup import ConfigError, load_config
from fiber_d2.modeling.meta_arch import FIBERCoarse

logger = logging.getLogger("fiber_d2.convert_fiber_checkpoint")

_META_ARCH_TARGET = META_ARCH_TARGET


def load_original(path: str):
    """Read the original file with ``weights_only=True`` (memory-mapped when the format allows).

    Raises:
        FileNotFoundError / ValueError: one line naming the file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input checkpoint not found: {path}")
    if path.endswith((".pkl", ".safetensors")):
        return load_checkpoint_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (
        Exception
    ):  # noqa: BLE001 - legacy (non-zip) files cannot be memory-mapped; retry plainly
        pass
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised as one line with the file name
        raise CheckpointError(torch_load_error(path, e)) from None


def detect_stage(original, use_ema: bool) -> str:
    """ "fine" or "coarse" from the key names of the state dict inside ``original``."""
    unwrap_state_dict(original, use_ema=use_ema)  # TypeError / KeyError for a bad container
    stage = original_layout(original, use_ema=use_ema)
    if stage is not None:
        return stage
    if fiber_d2_layout(original):
        raise ValueError(
            "it is already in fiber_d2's layout (converted before); give it to MODEL.WEIGHTS as is"
        )
    raise ValueError(
        "cannot tell the checkpoint layout (no fusion_backbone./rpn. or vit_model./text_transformer. "
        "keys); pass --stage"
    )


def project_config_keys(project: str) -> tuple:
    """Import ``projects/<project>``'s package (registering its models and datasets); returns its
    ``add_*_config`` functions."""
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "projects")
    if not os.path.isdir(os.path.join(root, project)):
        raise ConfigError(f"--project {project}: no folder projects/{project}")
    sys.path.insert(0, os.path.join(root, project))
    package = importlib.import_module(project.lower())
    return tuple(
        getattr(package, n) for n in dir(package) if n.startswith("add_") and n.endswith("_config")
    )


def target_of(meta_arch: str) -> str | None:
    """ "fine" for FIBER, "coarse" for FIBERCoarse and the task models built on it, else None."""
    if meta_arch in _META_ARCH_TARGET:
        return _META_ARCH_TARGET[meta_arch]
    from detectron2.modeling import META_ARCH_REGISTRY

    cls = META_ARCH_REGISTRY.get(meta_arch) if meta_arch in META_ARCH_REGISTRY else None
    return "coarse" if isinstance(cls, type) and issubclass(cls, FIBERCoarse) else None


def build_model_state(
    config_file: str, opts: list[str], extra_defaults: tuple = ()
) -> tuple[dict, str]:
    """The target model's state dict (meta tensors; CPU if a module cannot be built on meta) and its
    meta-architecture. Pretrained-weight paths are cleared: only the shapes are needed."""
    cfg = load_config(config_file, opts, extra_defaults=extra_defaults)
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.SWIN.WEIGHTS = ""
    cfg.MODEL.LANGUAGE_BACKBONE.WEIGHTS = ""
    try:
        cfg.MODEL.DEVICE = "meta"
        with torch.device("meta"):
            model = build_model(cfg)
    except (NotImplementedError, RuntimeError) as e:
        logger.info("building on the meta device failed (%s); building on the CPU", e)
        cfg.MODEL.DEVICE = "cpu"
        model = build_model(cfg)
    return model.state_dict(), cfg.MODEL.META_ARCHITECTURE


def _compact(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Clone tensors that view a larger storage, so torch.save writes only their own elements."""
    out = {}
    for k, v in state.items():
        own = v.numel() * v.element_size()
        out[k] = v.clone() if v.untyped_storage().nbytes() != own else v
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, metavar="ORIGINAL", help="original .pth / .ckpt")
    parser.add_argument("--output", required=True, metavar="OUT.pth", help="converted checkpoint")
    parser.add_argument("--stage", choices=["auto", "fine", "coarse"], default="auto")
    parser.add_argument("--target", choices=["coarse", "fine", "caption"], default=None)
    parser.add_argument("--config-file", default="", metavar="FILE", help="target model config")
    parser.add_argument("--use-ema", action="store_true", help="convert the model_ema weights")
    parser.add_argument("--project", default="", help="projects/<name> whose config is given")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    setup_logger(name="fiber_d2")
    # the tool prints the full summary once; the converter's own log line would repeat its first line
    logging.getLogger("fiber_d2.checkpoint.convert").setLevel(logging.WARNING)
    try:
        check_output_file(args.output, "--output")  # before the (long) conversion
    except ConfigError as e:
        sys.exit(f"error: {e}")
    try:
        report = convert(args)
    except ConfigError as e:  # the command line or the target config: not the checkpoint's fault
        sys.exit(f"error: {e}")
    except (FileNotFoundError, KeyError, TypeError, ValueError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        sys.exit(f"error: {args.input}: {msg}" if args.input not in str(msg) else f"error: {msg}")
    except OSError as e:  # e.g. a full disk while writing (the output appears whole or not at all)
        where = e.filename or f"--output {args.output}"
        sys.exit(f"error: {where}: cannot be written: {e.strerror or e}")
    print(report.summary())
    print(f"wrote {args.output}")


def check_report(report, path: str) -> None:
    """Refuse a conversion that mapped nothing or met shape mismatches (nothing is written).

    Raises:
        ValueError: one line; the report's summary is printed first.
    """
    counts = report.counts()
    if counts["mapped"] and not counts["shape_mismatches"]:
        return
    print(report.summary(), file=sys.stderr)
    if not counts["mapped"]:
        raise ValueError(
            f"{path}: no tensor was mapped ({counts['skipped']} skipped); nothing written"
        )
    first = report.shape_mismatches[0]
    raise ValueError(
        f"{path}: {counts['shape_mismatches']} shape mismatch(es) with the target model (first: "
        f"{first[0]} -> {first[1]}: checkpoint {first[2]}, model {first[3]}); check --config-file; "
        "nothing written"
    )


def convert(args):
    """Run one conversion from parsed arguments; returns the ConversionReport."""
    if os.path.abspath(args.input) == os.path.abspath(args.output):
        raise ConfigError(f"--output must differ from --input ({args.input})")
    if args.opts and not args.config_file:
        raise ConfigError(f"config overrides {args.opts} given without --config-file")
    if args.stage == "fine" and args.target in ("coarse", "caption"):
        raise ConfigError(
            f"--target {args.target} applies to a coarse-stage checkpoint, not --stage fine"
        )
    if args.target == "caption" and args.config_file:
        raise ConfigError(
            "--target caption takes no --config-file (FIBERCaption is a project model)"
        )
    model_state, meta_arch = None, None
    if args.config_file:
        extra = project_config_keys(args.project) if args.project else ()
        model_state, meta_arch = build_model_state(args.config_file, args.opts, extra)
        if target_of(meta_arch) is None:
            raise ConfigError(
                f"{args.config_file}: MODEL.META_ARCHITECTURE {meta_arch} is not FIBER(Coarse) or a"
                " task model built on FIBERCoarse (pass --project for a projects/ config)"
            )
    original = load_original(args.input)
    stage = detect_stage(original, args.use_ema) if args.stage == "auto" else args.stage
    detected = original_layout(original, use_ema=args.use_ema)
    if args.stage != "auto" and detected is not None and detected != stage:
        raise ValueError(
            f"{args.input} is a {detected}-grained checkpoint by its key names, not --stage "
            f"{stage} (the default, auto, reads the stage from them)"
        )
    target = args.target or (target_of(meta_arch) if meta_arch else None) or stage
    if stage == "fine" and target != "fine":
        raise ValueError(
            f"{args.input} is a fine-grained checkpoint; it converts to the FIBER detector only"
        )
    if meta_arch is not None and target_of(meta_arch) != target:
        raise ConfigError(f"--target {target} does not match {args.config_file} ({meta_arch})")
    if target == "caption":
        converted, report = convert_caption_state_dict(original, use_ema=args.use_ema)
    else:
        converted, report = convert_original(
            original, stage=stage, target=target, model_state=model_state, use_ema=args.use_ema
        )
    check_report(report, args.input)
    provenance = {
        "converter": "tools/convert_fiber_checkpoint.py",
        "fiber_d2_version": fiber_d2.__version__,
        "input": os.path.abspath(args.input),
        "input_bytes": os.path.getsize(args.input),
        "stage": stage,
        "target": target,
        "entry": report.source,
        "use_ema": bool(args.use_ema),
        "config_file": args.config_file,
        "opts": list(args.opts),
        "counts": report.counts(),
        "skipped": {reason: len(keys) for reason, keys in report.skipped_by_reason().items()},
        "missing_in_checkpoint": list(report.missing_in_checkpoint),
    }
    save_checkpoint_file(args.output, _compact(converted), provenance)
    logger.info("wrote %d tensors to %s", len(converted), args.output)
    return report


if __name__ == "__main__":
    main()
