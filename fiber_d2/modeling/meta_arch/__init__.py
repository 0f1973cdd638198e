"""Meta-architectures: the fine-grained detector and the coarse-grained pre-training model,
and the base of the fused-``cls_feats`` task models."""

from .fiber import FIBER
from .fiber_coarse import FIBERCoarse
from .fused_task import FIBERFusedTask, init_head, task_head

__all__ = ["FIBER", "FIBERCoarse", "FIBERFusedTask", "init_head", "task_head"]
