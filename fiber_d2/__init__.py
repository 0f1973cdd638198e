"""fiber_d2: FIBER (Fusion-In-the-Backbone vision-language transformer) for detectron2.

``import fiber_d2`` registers every component (backbone, meta-architectures, datasets,
evaluators) in detectron2's registries, and exports the user-facing entry points:

    from fiber_d2 import FIBERPredictor
    predictor = FIBERPredictor.from_pretrained("demo")
    result = predictor("image.jpg", ["red circle", "blue square"], threshold=0.3)
    picture = predictor.draw("image.jpg", result)
"""

import warnings

# fvcore (imported by detectron2) scripts its losses with torch.jit.script at import, which torch
# deprecates; the warning says nothing actionable to fiber_d2 users.
warnings.filterwarnings(
    "ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning
)

try:
    import detectron2  # noqa: E402,F401
except ImportError as e:  # not on PyPI: a plain `pip install` of fiber_d2 does not bring it
    raise ImportError(
        f"fiber_d2 needs detectron2, which is not importable ({e}); detectron2 is not on PyPI: "
        "see the README, 'Troubleshooting the detectron2 install'"
    ) from e

from . import data, evaluation, model_zoo, modeling  # noqa: E402,F401  (registers components)
from .config import add_fiber_config  # noqa: E402
from .data.datasets import register_grounding_coco  # noqa: E402
from .predictor import FIBERPredictor, to_coco_json  # noqa: E402
from .visualize import draw_grounding  # noqa: E402

__all__ = [
    "add_fiber_config",
    "FIBERPredictor",
    "register_grounding_coco",
    "draw_grounding",
    "model_zoo",
    "to_coco_json",
]
__version__ = "0.1.0"
