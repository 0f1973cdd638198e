"""fiber_d2: FIBER (Fusion-In-the-Backbone vision-language transformer) for detectron2.

``import fiber_d2`` registers every component (backbone, meta-architectures, datasets,
evaluators) in detectron2's registries.
"""

from . import data, evaluation, modeling  # noqa: F401  (registers datasets and models)
from .config import add_fiber_config

__all__ = ["add_fiber_config"]
__version__ = "0.1.0"
