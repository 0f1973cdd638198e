"""``add_image_tower_config``: the ImageTower project's own config keys (defaults only)."""

from detectron2.config import CfgNode as CN

__all__ = ["add_image_tower_config"]


def add_image_tower_config(cfg: CN) -> CN:
    """Add the ``IMAGE_TOWER`` node (with defaults) to a config that already has fiber_d2's keys.

    Args:
        cfg: a detectron2 config, usually ``add_fiber_config(get_cfg())``.

    Returns:
        the same ``cfg``, for chaining.
    """
    cfg.IMAGE_TOWER = CN()
    # Swin outputs whose tokens are classified (one linear classifier each)
    cfg.IMAGE_TOWER.LEVELS = ("res3", "res4", "res5")
    # weight of an image-level loss besides the token loss: the mean of the last level's tokens,
    # one linear layer, a binary cross-entropy per category against whether the image holds it
    # (multi-label image classification, as ImageNet-style pre-training labels whole images);
    # 0 = token loss only
    cfg.IMAGE_TOWER.PRESENCE_WEIGHT = 0.0
    # file written at the end of training with the tower in the Swin ImageNet layout, for
    # MODEL.SWIN.WEIGHTS (relative to OUTPUT_DIR)
    cfg.IMAGE_TOWER.EXPORT_NAME = "swin_weights.pth"
    # keep each training record's mapped inputs in memory after its first use (the mapping is
    # deterministic; about 52 KB per 128 px image): for small datasets seen for many epochs
    cfg.IMAGE_TOWER.CACHE_INPUTS = False
    return cfg
