"""Meta-architectures: the fine-grained detector and the coarse-grained pre-training model."""
