"""Trainer pieces: optimizer groups, EMA, weight-decay schedule, CPU DDP."""
