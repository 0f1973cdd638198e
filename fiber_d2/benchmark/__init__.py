"""Pieces of ``tools/benchmark.py``: synthetic inputs (:mod:`.inputs`), memory and time probes
(:mod:`.probes`) and the timed tasks (:mod:`.tasks`); the command line stays in the tool."""

from .inputs import (
    REFERENCE_OVERRIDES,
    chunked_prompts,
    coarse_batch,
    detector_batch,
    detector_prompt,
    input_size,
    model_inputs,
    reference_cfg,
)
from .probes import PeakMemory, SavedTensors
from .tasks import (
    bench_backbone,
    bench_caption,
    bench_export,
    bench_inference,
    bench_lvis_eval,
    bench_train,
    bench_train_fwd_bwd,
)

__all__ = [
    "REFERENCE_OVERRIDES",
    "PeakMemory",
    "SavedTensors",
    "bench_backbone",
    "bench_caption",
    "bench_export",
    "bench_inference",
    "bench_lvis_eval",
    "bench_train",
    "bench_train_fwd_bwd",
    "chunked_prompts",
    "coarse_batch",
    "detector_batch",
    "detector_prompt",
    "input_size",
    "model_inputs",
    "reference_cfg",
]
