"""Image captioning with FIBER's fused text tower as a causal decoder: MLE, GOLD and CIDEr-D stages,
beam / greedy decoding with a key/value cache, COCO caption metrics. Importing registers
``FIBERCaption``."""

from .cider import CiderD, build_document_frequency, normalise_caption, references_by_image
from .config import add_captioning_config
from .data import attach_references, build_caption_mapper, caption_train_records
from .decoding import beam_search, greedy_search, original_beam_search, sample_captions
from .evaluator import CaptionEvaluator, caption_metrics, metric_availability
from .losses import (
    gold_loss,
    gold_weights,
    mle_loss,
    next_token_labels,
    reinforce_loss,
    sequence_logprob,
)
from .model import FIBERCaption
from .trainer import CaptionTrainer, load_captioning_config

__all__ = [
    "CaptionEvaluator",
    "CaptionTrainer",
    "CiderD",
    "FIBERCaption",
    "add_captioning_config",
    "attach_references",
    "beam_search",
    "build_caption_mapper",
    "build_document_frequency",
    "caption_metrics",
    "caption_train_records",
    "gold_loss",
    "gold_weights",
    "greedy_search",
    "metric_availability",
    "mle_loss",
    "load_captioning_config",
    "next_token_labels",
    "normalise_caption",
    "original_beam_search",
    "references_by_image",
    "reinforce_loss",
    "sample_captions",
    "sequence_logprob",
]
