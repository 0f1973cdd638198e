"""Trainer pieces: optimizer groups, EMA, weight-decay schedule, CPU DDP.

``FIBERTrainer`` is detectron2's ``DefaultTrainer`` with FIBER's data loaders (text mapped with every
image), optimizer and checkpointer: ``from fiber_d2.engine import FIBERTrainer``.
"""

from .trainer import FIBERTrainer

__all__ = ["FIBERTrainer"]
