"""``ImageTowerPretrain``: FIBER's Swin image tower alone, with one linear classifier per level on
its tokens (background + the dataset's categories).

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

from fiber_d2.modeling.backbone.swin import SwinImageTower

__all__ = ["ImageTowerPretrain", "token_loss"]


def token_loss(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over levels of the token cross-entropy (mean over the level's tokens).

    Args:
        logits: {level: (B, h, w, K + 1)}; labels: {level: (B, h, w)} in [0, K].
    """
    return sum(F.cross_entropy(logits[k].flatten(0, 2), labels[k].flatten()) for k in logits)


@META_ARCH_REGISTRY.register()
class ImageTowerPretrain(nn.Module):
    """Inputs from :class:`image_tower.TokenLabelMapper`. Training returns ``{"loss_tokens"}``;
    inference returns per record ``{"token_logits": {level: (h, w, K + 1)}}``.

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
    ):
        """
        Args:
            image_tower: the Swin tower (no fusion blocks).
            levels: classified outputs, e.g. ("res3", "res4", "res5").
            num_classes: K categories (the classifiers have K + 1 outputs, 0 = background).
            pixel_mean, pixel_std: per-channel normalisation of the input image.
        """
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.image_tower = image_tower
        widths = {k: v.channels for k, v in image_tower.output_shape().items()}
        missing = [k for k in levels if k not in widths]
        if missing:
            raise ValueError(
                f"IMAGE_TOWER.LEVELS {missing} are not outputs of the tower "
                f"(MODEL.SWIN.OUT_FEATURES {sorted(widths)})"
            )
        self.levels = tuple(levels)
        self.classifiers = nn.ModuleDict({k: nn.Linear(widths[k], num_classes + 1) for k in levels})
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        dataset = cfg.DATASETS.TRAIN[0] if cfg.DATASETS.TRAIN else cfg.DATASETS.TEST[0]
        classes = MetadataCatalog.get(dataset).get("thing_classes", None)
        if not classes:
            raise ValueError(f"dataset {dataset!r} has no thing_classes metadata")
        tower_args = SwinImageTower.from_config(cfg)
        tower_args["num_fusion_blocks"] = 0
        return {
            "image_tower": SwinImageTower(**tower_args),
            "levels": tuple(cfg.IMAGE_TOWER.LEVELS),
            "num_classes": len(classes),
            "pixel_mean": tuple(cfg.MODEL.PIXEL_MEAN),
            "pixel_std": tuple(cfg.MODEL.PIXEL_STD),
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def token_logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, S, S) uint8 -> {level: (B, h, w, K + 1)} logits."""
        x = (images.to(self.device).float() - self.pixel_mean) / self.pixel_std
        features = self.backbone.image_tower(x)
        return {k: self.classifiers[k](features[k].permute(0, 2, 3, 1)) for k in self.levels}

    def forward(self, batched_inputs: list[dict]):
        logits = self.token_logits(torch.stack([x["image"] for x in batched_inputs]))
        if self.training:
            labels = {
                k: torch.stack([x["token_labels"][k] for x in batched_inputs]).to(self.device)
                for k in self.levels
            }
            return {"loss_tokens": token_loss(logits, labels)}
        return [
            {"token_logits": {k: v[i] for k, v in logits.items()}}
            for i in range(len(batched_inputs))
        ]
