"""FIBER models: the fused backbone, the grounding head and the meta-architectures."""

from . import backbone  # noqa: F401
