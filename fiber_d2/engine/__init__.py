"""Trainer pieces: optimizer groups, EMA, weight-decay schedule, CPU DDP, and what lets a killed run
resume as if uninterrupted (``resume``, ``random_stream``).

``FIBERTrainer`` is detectron2's ``DefaultTrainer`` with FIBER's data loaders (text mapped with every
image), optimizer and checkpointer: ``from fiber_d2.engine import FIBERTrainer``.
"""

from .trainer import FIBERTrainer

__all__ = ["FIBERTrainer"]
