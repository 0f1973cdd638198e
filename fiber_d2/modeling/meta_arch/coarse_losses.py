"""The coarse-grained objectives: image-text contrastive (ITC) with a feature queue, hard-negative sampling
for image-text matching (ITM), and masked language modelling (MLM). Spec: coarse_grained.md §3.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

__all__ = ["itc_logits", "itc_loss", "sample_hard_negatives", "mlm_loss", "FeatureQueue"]

logger = logging.getLogger(__name__)


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
    """Draw one negative column per row with probability softmax(sim), never the row's positive
    (unless it is the only column).

    Args:
        sim: (B, N) similarity logits (already divided by the temperature) of each local sample to the
            candidate pool (e.g. the batch gathered over all ranks).
        positive_index: (B,) column of each row's own pair in the pool.

    Returns:
        (B,) long indices into the pool.
    """
    if sim.shape[1] == 1:
        # only the row's own pair: the original's +1e-9 on zero weights draws it (a degenerate
        # pool: one sample per process before anything is queued)
        return positive_index.clone()
    # The original adds 1e-9 after zeroing the positive, leaving it a tiny chance; here it has none.
    weights = sim.float().softmax(dim=1) + 1e-9
    bad_rows = ~torch.isfinite(weights).all(dim=1)
    if bad_rows.any():
        # NaN or +inf similarities (fp16 overflow, or a diverged model): torch.multinomial would stop
        # the run (a device-side assert on CUDA). Those rows draw uniformly; their ITC loss is not
        # finite either, so the trainer decides: under AMP the step is skipped and the run goes on,
        # without AMP detectron2 stops it (fiber_d2.engine.train_step).
        logger.warning(
            "ITM hard negatives: the ITC similarities of %d of %d samples are NaN or +inf; their "
            "negatives are drawn uniformly",
            int(bad_rows.sum()),
            sim.shape[0],
        )
        weights[bad_rows] = 1.0
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
    """Ring buffers of image and text embeddings for ITC (``image_queue``/``text_queue`` (D, Q)), and
    optionally of the raw inputs they came from, for ITM's hard negatives (:meth:`hold_inputs`).

    Initialised with ``randn`` and not normalised, like the original; ``queue_total`` counts every
    enqueued sample (never capped). A run that starts from a checkpoint (not resuming) starts with
    a fresh queue, as the original's fine-tuning load (coarse spec §5.1): ``FIBERCheckpointer``
    skips the buffers of modules marked ``fresh_each_run``.
    """

    fresh_each_run = True
    INPUT_BUFFERS = ("image_input_queue", "text_input_queue", "text_input_mask_queue")

    def __init__(self, dim: int, size: int):
        super().__init__()
        self.register_buffer("image_queue", torch.randn(dim, size))
        self.register_buffer("text_queue", torch.randn(dim, size))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.register_buffer("queue_total", torch.zeros(1, dtype=torch.long))

    def hold_inputs(self, image_size: int, text_length: int, pad_token_id: int) -> None:
        """Also keep each enqueued sample's inputs in the slot of its embeddings (coarse spec §3.3).

        The original keeps the normalised float32 images (7.25 GB per process at 384 px); this
        keeps the mapper's uint8 images (a quarter of that; the spec's §8.2 allows it), which
        normalise to the same tensors.

        Args:
            image_size: S of the (3, S, S) images (``INPUT.IMAGE_SIZE``).
            text_length: T of the (T,) token ids and masks (``MAX_QUERY_LEN``); shorter texts are
                padded with ``pad_token_id`` and mask 0.
            pad_token_id: the tokenizer's pad id.
        """
        size = self.image_queue.shape[1]
        self.register_buffer(
            "image_input_queue", torch.zeros(size, 3, image_size, image_size, dtype=torch.uint8)
        )
        self.register_buffer(
            "text_input_queue", torch.full((size, text_length), pad_token_id, dtype=torch.long)
        )
        self.register_buffer("text_input_mask_queue", torch.zeros(size, text_length).long())
        self.pad_token_id = pad_token_id

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A queue saved without inputs (``ITM_NEGATIVES "batch"``, or before the input queue
        existed) restarts empty when this one holds inputs: its filled slots would have none."""
        saved = [k for k in state_dict if k.startswith(prefix)]
        if self.holds_inputs and saved and prefix + "image_input_queue" not in state_dict:
            logger.warning(
                "%squeue: the checkpoint has no ITM input queue; the ITC queue restarts empty",
                prefix,
            )
            for k in saved:
                del state_dict[k]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def holds_inputs(self) -> bool:
        return hasattr(self, "image_input_queue")

    @property
    def filled(self) -> int:
        """Slots written so far: 0 .. filled-1 (the pointer starts at 0)."""
        return int(min(self.queue_total.item(), self.image_queue.shape[1]))

    @torch.no_grad()
    def enqueue(
        self,
        f_i: torch.Tensor,
        f_t: torch.Tensor,
        inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Write (N, D) embeddings (gathered over ranks) at the pointer, wrapping around.

        Args:
            f_i, f_t: (N, D) image and text embeddings.
            inputs: with :meth:`hold_inputs`, their inputs: uint8 images (N, 3, S, S), token ids
                and attention mask (N, T') with T' <= T.
        """
        size = self.image_queue.shape[1]
        n = f_i.shape[0]
        idx = (self.queue_ptr + torch.arange(n, device=f_i.device)) % size
        self.image_queue[:, idx] = f_i.t().to(self.image_queue.dtype)
        self.text_queue[:, idx] = f_t.t().to(self.text_queue.dtype)
        if self.holds_inputs:
            if inputs is None:
                raise ValueError("this queue holds inputs: enqueue needs the samples' inputs")
            images, ids, mask = self._fit_inputs(*inputs)
            self.image_input_queue[idx] = images
            self.text_input_queue[idx] = ids
            self.text_input_mask_queue[idx] = mask
        self.queue_ptr.copy_((self.queue_ptr + n) % size)
        self.queue_total += n

    def _fit_inputs(self, images, ids, mask):
        """Check the inputs against the buffers; pad texts to the buffer length."""
        want = tuple(self.image_input_queue.shape[1:])
        if tuple(images.shape[1:]) != want or images.dtype != torch.uint8:
            raise ValueError(
                f"the ITM input queue holds uint8 images {want} (INPUT.IMAGE_SIZE), got "
                f"{images.dtype} {tuple(images.shape[1:])}"
            )
        length, t = self.text_input_queue.shape[1], ids.shape[1]
        if t > length:
            raise ValueError(
                f"the ITM input queue holds texts of {length} tokens "
                f"(MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN), got {t}"
            )
        ids = F.pad(ids.long(), (0, length - t), value=self.pad_token_id)
        return images, ids, F.pad(mask.long(), (0, length - t), value=0)

    def take_inputs(
        self,
        image_rows: torch.Tensor,
        text_rows: torch.Tensor,
        images: torch.Tensor,
        ids: torch.Tensor,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images of ``image_rows`` and texts of ``text_rows`` of the pool [the B local samples ;
        queue slots 0 .. filled-1], the column order of :func:`itc_logits` (batch, then queue).

        Args:
            image_rows, text_rows: (P,) long indices into the pool.
            images, ids, mask: the local samples' inputs, (B, 3, S, S) uint8 and (B, T') each.

        Returns:
            images (P, 3, S, S) uint8, ids and mask (P, T) at the buffer length T.
        """
        images, ids, mask = self._fit_inputs(images, ids, mask)
        b = images.shape[0]
        out = []
        for rows, own, queued in (
            (image_rows, images, self.image_input_queue),
            (text_rows, ids, self.text_input_queue),
            (text_rows, mask, self.text_input_mask_queue),
        ):
            local = rows < b
            taken = own.new_empty((rows.shape[0], *own.shape[1:]))
            taken[local] = own[rows[local]]
            taken[~local] = queued[rows[~local] - b].to(own.device)
            out.append(taken)
        return tuple(out)
