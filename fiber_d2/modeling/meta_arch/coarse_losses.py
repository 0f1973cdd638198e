"""The coarse-grained objectives: image-text contrastive (ITC) with a feature queue, hard-negative sampling
for image-text matching (ITM), and masked language modelling (MLM). Spec: coarse_grained.md §3.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["itc_logits", "itc_loss", "sample_hard_negatives", "mlm_loss", "FeatureQueue"]


def itc_logits(
    f_i: torch.Tensor,
    f_t: torch.Tensor,
    image_queue: torch.Tensor,
    text_queue: torch.Tensor,
    temp: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Contrastive logits against the detached in-batch features followed by the queue.

    Args:
        f_i, f_t: (B, D) L2-normalised image / text embeddings.
        image_queue, text_queue: (D, Q) queued embeddings (not re-normalised, as in the original).
        temp: scalar temperature.

    Returns:
        ``sim_i2t = f_i [f_t.detach() | text_queue] / temp`` and ``sim_t2i`` likewise, each (B, B + Q).
    """
    sim_i2t = f_i @ torch.cat([f_t.detach().t(), text_queue], dim=1) / temp
    sim_t2i = f_t @ torch.cat([f_i.detach().t(), image_queue], dim=1) / temp
    return sim_i2t, sim_t2i


def itc_loss(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor) -> torch.Tensor:
    """``0.5 * (CE(sim_i2t) + CE(sim_t2i))`` with the positive of row b in column b."""
    target = torch.arange(sim_i2t.shape[0], device=sim_i2t.device)
    return 0.5 * (F.cross_entropy(sim_i2t, target) + F.cross_entropy(sim_t2i, target))


@torch.no_grad()
def sample_hard_negatives(
    sim: torch.Tensor, positive_index: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw one negative column per row with probability softmax(sim), never the row's positive.

    Args:
        sim: (B, N) similarity logits (already divided by the temperature) of each local sample to the
            candidate pool (e.g. the batch gathered over all ranks).
        positive_index: (B,) column of each row's own pair in the pool.

    Returns:
        (B,) long indices into the pool.
    """
    if sim.shape[1] < 2:
        raise ValueError("hard-negative sampling needs at least two candidates in the pool")
    # The original adds 1e-9 after zeroing the positive, leaving it a tiny chance; here it has none.
    weights = sim.float().softmax(dim=1) + 1e-9
    weights[torch.arange(sim.shape[0], device=sim.device), positive_index] = 0.0
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over masked positions only (labels -100 elsewhere).

    Args:
        logits: (B, T, V); labels: (B, T) long.

    Returns:
        scalar loss (0 with a gradient path when nothing is masked).
    """
    if (labels != -100).any():
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
    return logits.sum() * 0.0


class FeatureQueue(torch.nn.Module):
    """Ring buffers of image and text embeddings for ITC (``image_queue``/``text_queue`` (D, Q)).

    Initialised with ``randn`` and not normalised, like the original; ``queue_total`` counts every
    enqueued sample (never capped). A run that starts from a checkpoint (not resuming) starts with
    a fresh queue, as the original's fine-tuning load (coarse spec §5.1): ``FIBERCheckpointer``
    skips the buffers of modules marked ``fresh_each_run``.
    """

    fresh_each_run = True

    def __init__(self, dim: int, size: int):
        super().__init__()
        self.register_buffer("image_queue", torch.randn(dim, size))
        self.register_buffer("text_queue", torch.randn(dim, size))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.register_buffer("queue_total", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, f_i: torch.Tensor, f_t: torch.Tensor) -> None:
        """Write (N, D) embeddings (gathered over ranks) at the pointer, wrapping around."""
        size = self.image_queue.shape[1]
        n = f_i.shape[0]
        idx = (self.queue_ptr + torch.arange(n, device=f_i.device)) % size
        self.image_queue[:, idx] = f_i.t().to(self.image_queue.dtype)
        self.text_queue[:, idx] = f_t.t().to(self.text_queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + n) % size)
        self.queue_total += n
