"""Checkpoint reading/writing (safe formats only), original-FIBER conversion and loading."""

from .checkpointer import FIBERCheckpointer, load_model_weights, load_state_dict_file
from .safe_io import CheckpointError, load_checkpoint_file, save_checkpoint_file

__all__ = [
    "CheckpointError",
    "FIBERCheckpointer",
    "load_checkpoint_file",
    "load_model_weights",
    "load_state_dict_file",
    "save_checkpoint_file",
]
