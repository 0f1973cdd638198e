"""``ImageTowerPretrain``: FIBER's Swin image tower alone, with one linear classifier per level on
its tokens (background + the dataset's categories) and optionally one on the mean of the last level's
tokens (which categories the image holds).

The shapes Demo's stand-in for the ImageNet pre-training that FIBER's image tower starts from: the
tower is built from ``MODEL.SWIN`` exactly as in the FIBER models (without fusion modules, which
ImageNet checkpoints do not have either), and is exported in the Swin ImageNet layout that
``MODEL.SWIN.WEIGHTS`` reads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from fiber_d2.config import ConfigError
from fiber_d2.modeling.backbone.swin import SwinImageTower

__all__ = ["ImageTowerPretrain", "category_names", "presence_loss", "token_loss"]


def token_loss(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over levels of the token cross-entropy (mean over the level's tokens).

    Args:
        logits: {level: (B, h, w, K + 1)}; labels: {level: (B, h, w)} in [0, K].
    """
    return sum(F.cross_entropy(logits[k].flatten(0, 2), labels[k].flatten()) for k in logits)


def presence_loss(logits: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy per category, mean over images and categories.

    Args:
        logits: (B, K); presence: (B, K) in {0, 1} (1 = the image holds the category).
    """
    return F.binary_cross_entropy_with_logits(logits, presence.to(logits.dtype))


def category_names(cfg) -> list[str]:
    """The classified categories: ``thing_classes`` of the first training dataset (of the first test
    dataset without one)."""
    dataset = cfg.DATASETS.TRAIN[0] if cfg.DATASETS.TRAIN else cfg.DATASETS.TEST[0]
    classes = MetadataCatalog.get(dataset).get("thing_classes", None)
    if not classes:
        raise ValueError(f"dataset {dataset!r} has no thing_classes metadata")
    return list(classes)


@META_ARCH_REGISTRY.register()
class ImageTowerPretrain(nn.Module):
    """Inputs from :class:`image_tower.TokenLabelMapper`. Training returns ``{"loss_tokens"}`` (and
    ``"loss_presence"`` when ``presence_weight`` > 0); inference returns per record
    ``{"token_logits": {level: (h, w, K + 1)}}`` (and ``"presence_logits"``: (K,)).

    Parameters are named as in the FIBER models (``backbone.image_tower.*``).
    """

    @configurable
    def __init__(
        self,
        *,
        image_tower: SwinImageTower,
        levels: tuple[str, ...],
        num_classes: int,
        pixel_mean: tuple[float, ...],
        pixel_std: tuple[float, ...],
        presence_weight: float = 0.0,
    ):
        """
        Args:
            image_tower: the Swin tower (no fusion blocks).
            levels: classified outputs, e.g. ("res3", "res4", "res5").
            num_classes: K categories (the classifiers have K + 1 outputs, 0 = background).
            pixel_mean, pixel_std: per-channel normalisation of the input image.
            presence_weight: weight of :func:`presence_loss` on a linear layer over the mean of the
                last level's tokens; 0 builds no such layer.
        """
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.image_tower = image_tower
        widths = {k: v.channels for k, v in image_tower.output_shape().items()}
        missing = [k for k in levels if k not in widths]
        if missing:
            raise ConfigError(
                f"IMAGE_TOWER.LEVELS {missing} are not outputs of the tower "
                f"(MODEL.SWIN.OUT_FEATURES {sorted(widths)})"
            )
        self.levels = tuple(levels)
        self.classifiers = nn.ModuleDict({k: nn.Linear(widths[k], num_classes + 1) for k in levels})
        self.presence_weight = presence_weight
        self.presence_level = max(levels, key=lambda k: int(k[3:]))
        self.presence_classifier = (
            nn.Linear(widths[self.presence_level], num_classes) if presence_weight > 0 else None
        )
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        classes = category_names(cfg)
        tower_args = SwinImageTower.from_config(cfg)
        tower_args["num_fusion_blocks"] = 0
        return {
            "image_tower": SwinImageTower(**tower_args),
            "levels": tuple(cfg.IMAGE_TOWER.LEVELS),
            "num_classes": len(classes),
            "pixel_mean": tuple(cfg.MODEL.PIXEL_MEAN),
            "pixel_std": tuple(cfg.MODEL.PIXEL_STD),
            "presence_weight": cfg.IMAGE_TOWER.PRESENCE_WEIGHT,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def logits(self, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """(B, 3, S, S) uint8 -> ({level: (B, h, w, K + 1)} token logits, (B, K) presence logits or
        None without a presence classifier)."""
        x = (images.to(self.device).float() - self.pixel_mean) / self.pixel_std
        features = self.backbone.image_tower(x)
        tokens = {k: self.classifiers[k](features[k].permute(0, 2, 3, 1)) for k in self.levels}
        if self.presence_classifier is None:
            return tokens, None
        return tokens, self.presence_classifier(features[self.presence_level].mean(dim=(2, 3)))

    def forward(self, batched_inputs: list[dict]):
        logits, presence = self.logits(torch.stack([x["image"] for x in batched_inputs]))
        if self.training:
            labels = {
                k: torch.stack([x["token_labels"][k] for x in batched_inputs]).to(self.device)
                for k in self.levels
            }
            losses = {"loss_tokens": token_loss(logits, labels)}
            if presence is not None:
                target = torch.stack([x["presence"] for x in batched_inputs]).to(self.device)
                losses["loss_presence"] = self.presence_weight * presence_loss(presence, target)
            return losses
        results = [
            {"token_logits": {k: v[i] for k, v in logits.items()}}
            for i in range(len(batched_inputs))
        ]
        if presence is not None:
            for r, p in zip(results, presence):
                r["presence_logits"] = p
        return results
