"""Datasets, mappers and the built-in shapes world.

Importing this package registers the standard datasets (see ``datasets/builtin.py``).
"""

from . import datasets  # noqa: F401  (registers datasets on import)
from .caption_mapper import CaptionDatasetMapper
from .mapper import GroundingDatasetMapper
from .shapes import ensure_shapes_tokenizer, ensure_shapes_world, generate_shapes

__all__ = [
    "CaptionDatasetMapper",
    "GroundingDatasetMapper",
    "ensure_shapes_tokenizer",
    "ensure_shapes_world",
    "generate_shapes",
]
