"""Released-checkpoint key mapping (fine-grained and coarse-grained layouts)."""
