"""Meta-architectures: the fine-grained detector and the coarse-grained pre-training model."""

from .fiber import FIBER
from .fiber_coarse import FIBERCoarse

__all__ = ["FIBER", "FIBERCoarse"]
