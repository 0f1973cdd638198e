"""Supervised pre-training of FIBER's Swin image tower on box-labelled data, exported in the Swin
ImageNet layout that ``MODEL.SWIN.WEIGHTS`` reads: the shapes Demo's stand-in for the ImageNet
pre-training the real FIBER image tower starts from. Importing registers the model."""

from .config import add_image_tower_config
from .evaluator import TokenAccuracyEvaluator
from .mapper import TokenLabelMapper, token_labels
from .modeling import ImageTowerPretrain, category_names, presence_loss, token_loss
from .trainer import ImageTowerTrainer, export_swin_weights, load_image_tower_config

__all__ = [
    "ImageTowerPretrain",
    "ImageTowerTrainer",
    "TokenAccuracyEvaluator",
    "TokenLabelMapper",
    "add_image_tower_config",
    "category_names",
    "export_swin_weights",
    "load_image_tower_config",
    "presence_loss",
    "token_labels",
    "token_loss",
]
