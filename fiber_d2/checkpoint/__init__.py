"""Checkpoint reading/writing (safe formats only), original-FIBER conversion and loading."""

from .checkpointer import (
    FIBERCheckpointer,
    final_is_current,
    load_model_weights,
    load_state_dict_file,
    run_finished,
)
from .safe_io import CheckpointError, load_checkpoint_file, save_checkpoint_file

__all__ = [
    "CheckpointError",
    "FIBERCheckpointer",
    "final_is_current",
    "load_checkpoint_file",
    "load_model_weights",
    "load_state_dict_file",
    "run_finished",
    "save_checkpoint_file",
]
