#!/usr/bin/env python
"""Can FIBER's image tower learn to see the shapes world from an image-level signal?

A diagnostic for the from-scratch shapes demos (VQA, NLVR2, captioning and the coarse stage all
read the image through pooled features of the last Swin stage): it trains the image tower of a
config end to end, plus one linear layer on its pooled stage features, to predict which of the 12
(colour, kind) categories an image contains (multi-label BCE), and reports the held-out label
accuracy against the majority baseline every ``--eval-period`` steps.

    python tools/probe_image_tower.py --config-file configs/Demo/coarse_tiny.yaml \\
        [--stage res5] [--pool mean|max] [--steps 600] [--lr 3e-4] [--num-train 256] \\
        [--world DIR] [--control cnn|timm-swin] [MODEL.WEIGHTS PATH MODEL.WEIGHTS_PARTIAL_OK True] \\
        [KEY VALUE ...]

The tower starts from ``MODEL.WEIGHTS`` (e.g. a coarse or detector checkpoint; partial checkpoints
need ``MODEL.WEIGHTS_PARTIAL_OK True``) or from its random initialisation.

``--control`` trains another network on the same data, labels, optimiser and steps instead: ``cnn``
(four 3x3 convolutions, 32-64-64-64 channels, ReLU) or ``timm-swin`` (timm's own
``SwinTransformer`` at the config's Swin sizes, no fusion): whether a failure is the data's, Swin's,
or the tower's.

``--num-train N`` generates (once) a shapes world with N training images from the same seed
(``--world``, default ``$FIBER_D2_HOME/shapes_probe_<N>``); its first 256 training images and its
validation split are those of the default world. Output: one JSON line per evaluation.
"""

from __future__ import annotations

import fiber_d2  # noqa: F401  # isort: skip  (imported first: registers FIBER, quiets fvcore)

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model
from PIL import Image

from fiber_d2.checkpoint import CheckpointError, load_model_weights
from fiber_d2.data.shapes import CATEGORY_NAMES, ensure_shapes_world, shapes_files, shapes_root
from fiber_d2.data.vl_transforms import build_vl_image_transform
from fiber_d2.engine.setup import ConfigError, load_config
from fiber_d2.model_zoo.weights import fiber_d2_home

logger = logging.getLogger("fiber_d2.probe_image_tower")


def world_root(num_train: int, world: str | None) -> Path:
    """The shapes world to probe on: the default one, or one with ``num_train`` training images."""
    if world:
        return ensure_shapes_world(world, num_train=num_train)
    if num_train == 256:
        return ensure_shapes_world(shapes_root())
    return ensure_shapes_world(fiber_d2_home() / f"shapes_probe_{num_train}", num_train=num_train)


def presence_data(root: Path, split: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, S, S) uint8 images resized as the VL mappers do and (N, 12) 0/1 category presence."""
    files = shapes_files(root, split)
    with open(files["det"], encoding="utf-8") as f:
        det = json.load(f)
    labels = {im["id"]: torch.zeros(len(CATEGORY_NAMES)) for im in det["images"]}
    for a in det["annotations"]:
        labels[a["image_id"]][a["category_id"] - 1] = 1.0
    resize = build_vl_image_transform("resize", size, is_train=False)
    images = []
    for im in det["images"]:
        with Image.open(Path(files["image_root"]) / im["file_name"]) as pil:
            images.append(resize(np.asarray(pil.convert("RGB"))))
    x = torch.as_tensor(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return x, torch.stack([labels[im["id"]] for im in det["images"]])


class PresenceProbe(torch.nn.Module):
    """The config's image tower, pooling of one stage, and a linear classifier.

    Args:
        model: a FIBER coarse-family model (``backbone.forward_image``, ``pixel_mean``/``pixel_std``).
        stage: the stage read ("res2" ... "res5").
        pool: "mean" or "max" over the stage's positions.
        image_size: the input side S (a dummy forward finds the stage's width).
    """

    def __init__(self, model: torch.nn.Module, stage: str, pool: str, image_size: int):
        super().__init__()
        self.backbone = model.backbone
        self.register_buffer("pixel_mean", model.pixel_mean.clone(), False)
        self.register_buffer("pixel_std", model.pixel_std.clone(), False)
        self.stage, self.pool = stage, pool
        with torch.no_grad():
            probe = torch.zeros(1, 3, image_size, image_size, device=model.pixel_mean.device)
            features = self.backbone.forward_image(probe)
        if stage not in features:
            raise ValueError(f"--stage {stage!r} is not one of {sorted(features)}")
        self.classifier = torch.nn.Linear(features[stage].shape[1], len(CATEGORY_NAMES))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) uint8 -> (B, 12) presence logits."""
        x = (images.float() - self.pixel_mean) / self.pixel_std
        f = self.backbone.forward_image(x)[self.stage]  # (B, C, h, w)
        pooled = f.amax(dim=(2, 3)) if self.pool == "max" else f.mean(dim=(2, 3))
        return self.classifier(pooled)


class ControlProbe(torch.nn.Module):
    """A control network in place of the tower: a small CNN or timm's plain Swin, pooled the same way.

    Args:
        kind: "cnn" or "timm-swin".
        cfg: the config (pixel normalisation; ``MODEL.SWIN`` sizes for "timm-swin").
        pool: "mean" or "max" over the last feature map's positions.
    """

    def __init__(self, kind: str, cfg, pool: str):
        super().__init__()
        self.register_buffer("pixel_mean", torch.tensor(cfg.MODEL.PIXEL_MEAN).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(cfg.MODEL.PIXEL_STD).view(-1, 1, 1), False)
        self.pool, self.kind = pool, kind
        if kind == "cnn":
            layers, channels = [], 3
            for width, stride in ((32, 2), (64, 1), (64, 2), (64, 1)):
                layers += [torch.nn.Conv2d(channels, width, 3, stride, 1), torch.nn.ReLU()]
                channels = width
            self.features = torch.nn.Sequential(*layers)
        elif kind == "timm-swin":
            from timm.models.swin_transformer import SwinTransformer

            swin = cfg.MODEL.SWIN
            self.features = SwinTransformer(
                img_size=cfg.INPUT.IMAGE_SIZE,
                patch_size=swin.PATCH_SIZE,
                embed_dim=swin.EMBED_DIM,
                depths=tuple(swin.DEPTHS),
                num_heads=tuple(swin.NUM_HEADS),
                window_size=swin.WINDOW_SIZE,
                drop_path_rate=swin.DROP_PATH_RATE,
                num_classes=0,
            )
            channels = self.features.num_features
        else:
            raise ValueError(f"--control must be 'cnn' or 'timm-swin', got {kind!r}")
        self.classifier = torch.nn.Linear(channels, len(CATEGORY_NAMES))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) uint8 -> (B, 12) presence logits."""
        x = (images.float() - self.pixel_mean) / self.pixel_std
        if self.kind == "cnn":
            f = self.features(x)  # (B, C, h, w)
        else:
            f = self.features.forward_features(x).permute(0, 3, 1, 2)  # timm: (B, h, w, C)
        pooled = f.amax(dim=(2, 3)) if self.pool == "max" else f.mean(dim=(2, 3))
        return self.classifier(pooled)


def label_accuracy(probe: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of the (image, category) presence labels predicted right."""
    probe.eval()
    device = next(probe.parameters()).device
    with torch.no_grad():
        pred = torch.cat([probe(x[i : i + 64].to(device)).cpu() for i in range(0, len(x), 64)]) > 0
    probe.train()
    return float((pred.float() == y).float().mean())


def run(args: argparse.Namespace) -> list[dict]:
    """Train the probe; returns (and prints) one record per evaluation."""
    cfg = load_config(args.config_file, args.opts)
    torch.manual_seed(args.seed)
    size = cfg.INPUT.IMAGE_SIZE
    if args.control:
        probe = ControlProbe(args.control, cfg, args.pool)
    else:
        model = build_model(cfg)
        if cfg.MODEL.WEIGHTS:
            load_model_weights(model, cfg, inference=False)  # only its features are read
        probe = PresenceProbe(model, args.stage, args.pool, size)
        del model
    probe.to(cfg.MODEL.DEVICE)  # the data stays on the CPU; each batch is moved
    root = world_root(args.num_train, args.world)
    x_train, y_train = presence_data(root, "train", size)
    x_val, y_val = presence_data(root, "val", size)

    def majority(y: torch.Tensor) -> float:  # predicting each category's commoner label
        return float(torch.maximum(y.mean(0), 1 - y.mean(0)).mean())

    optimizer = torch.optim.AdamW(probe.parameters(), lr=args.lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(args.seed)
    records = []
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(x_train), (args.batch,), generator=g)
        logits = probe(x_train[idx].to(cfg.MODEL.DEVICE))
        loss = F.binary_cross_entropy_with_logits(logits, y_train[idx].to(logits.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % args.eval_period == 0 or step == args.steps:
            rec = {
                "step": step,
                "train_loss": round(loss.item(), 4),
                "train_label_acc": round(label_accuracy(probe, x_train, y_train), 4),
                "val_label_acc": round(label_accuracy(probe, x_val, y_val), 4),
                "train_majority": round(majority(y_train), 4),
                "val_majority": round(majority(y_val), 4),
                "num_train": len(x_train),
                "tower": args.control or "fiber",
                "stage": "last" if args.control else args.stage,
                "pool": args.pool,
                "image_size": size,
            }
            print(json.dumps(rec), flush=True)
            records.append(rec)
    return records


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-file", required=True)
    p.add_argument("--stage", default="res5")
    p.add_argument("--pool", choices=("mean", "max"), default="mean")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--eval-period", type=int, default=200)
    p.add_argument("--num-train", type=int, default=256, help="training images of the world")
    p.add_argument("--world", default=None, help="directory of the (generated) world")
    p.add_argument("--control", choices=("cnn", "timm-swin"), default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = _parser().parse_args(argv)
    if not os.path.isfile(args.config_file):
        sys.exit(f"error: config file not found: {args.config_file}")
    for flag in ("steps", "batch", "eval_period", "num_train"):
        if getattr(args, flag) < 1:
            sys.exit(
                f"error: --{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}"
            )
    try:
        return run(args)
    except (
        ConfigError,
        CheckpointError,
        ValueError,
        OSError,
    ) as e:  # a bad key, weights, stage, world
        sys.exit(f"error: {' '.join(str(e).split())}")


if __name__ == "__main__":
    main()
