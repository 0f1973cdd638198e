"""A tiny ``FIBERCoarse`` (the Demo config, two fused layers, 64 px) and a caption batch for it,
shared by the coarse-model tests of this folder (which is on ``sys.path`` while they run)."""

import torch

from fiber_d2.engine.setup import load_config
from fiber_d2.modeling.meta_arch.fiber_coarse import FIBERCoarse

SMALL = ["MODEL.SWIN.DEPTHS", "[2, 2, 2, 2]", "MODEL.FIBER.NUM_FUSION_LAYERS", "2"]
SMALL += ["INPUT.IMAGE_SIZE", "64", "MODEL.COARSE.QUEUE_SIZE", "16"]
# the original's ITC (the defaults), spelled out
ORIGINAL = [
    "MODEL.COARSE.ITC_TEXT_POOL",
    "first",
    "MODEL.COARSE.QUEUE_INIT",
    "random",
    "MODEL.COARSE.ITC_BATCH_NORM",
    "False",
]
ITC_ONLY = ["MODEL.COARSE.LOSSES", "['itc']", "MODEL.COARSE.LOSS_WEIGHTS", "[1.0]"]


def tiny_coarse(*opts: str) -> FIBERCoarse:
    """``configs/Demo/coarse_tiny.yaml`` at the sizes of ``SMALL``, seed 0, then ``opts``."""
    torch.manual_seed(0)
    return FIBERCoarse(load_config("configs/Demo/coarse_tiny.yaml", [*SMALL, *opts]))


def caption_batch(b: int = 4, t: int = 9, size: int = 64):
    """``b`` records of a random uint8 image and caption; captions 1 and 3 are padded (ids 1).

    Returns:
        records (the model's input), ids (b, t), attention mask (b, t).
    """
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 900, (b, t), generator=g)
    ids[:, 0] = 0
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 5:] = 0
    mask[3, 3:] = 0
    ids[mask == 0] = 1
    images = torch.randint(0, 256, (b, 3, size, size), generator=g, dtype=torch.uint8)
    records = [
        {"image": images[k], "input_ids": ids[k], "attention_mask": mask[k]} for k in range(b)
    ]
    return records, ids, mask
