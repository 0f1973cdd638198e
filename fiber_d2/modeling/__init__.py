"""FIBER models: the fused backbone, the grounding head and the meta-architectures."""

from . import backbone, head  # noqa: F401
from .meta_arch import FIBER, FIBERCoarse

__all__ = ["FIBER", "FIBERCoarse"]
