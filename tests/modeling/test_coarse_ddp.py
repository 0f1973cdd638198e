"""Two gloo processes: ITM hard negatives come from the batch gathered over both ranks, or from the
queue of the inputs gathered over both."""

import pytest
import torch
from tiny_coarse import caption_batch, tiny_coarse
from torch.nn.parallel import DistributedDataParallel
from two_ranks import run_two_ranks

from fiber_d2.engine.setup import load_config
from fiber_d2.modeling.meta_arch.fiber_coarse import FIBERCoarse

B = 3


def _itm_pairs(rank):
    torch.manual_seed(rank)
    cfg = load_config(
        "configs/Demo/coarse_tiny.yaml",
        ["MODEL.SWIN.DEPTHS", "[2, 2, 2, 2]", "MODEL.FIBER.NUM_FUSION_LAYERS", "2"],
    )
    model = FIBERCoarse(cfg)
    # sample (rank, b) is identified by the constant value of its image and by its token ids
    uid = torch.arange(B) + 10 * rank
    images = uid.view(B, 1, 1, 1).float().expand(B, 3, 4, 4).contiguous()
    ids = uid.view(B, 1).expand(B, 5).contiguous()
    mask = torch.ones(B, 5, dtype=torch.long)
    f = torch.nn.functional.normalize(torch.randn(B, 8), dim=-1)
    seen_other_rank = False
    for _ in range(30):
        imgs, pids, _, labels = model.itm_pairs(images, ids, mask, f, f)
        img_uid, txt_uid = imgs[:, 0, 0, 0].long(), pids[:, 0]
        assert torch.equal(img_uid[:B], uid) and torch.equal(txt_uid[:B], uid)  # positives
        assert torch.equal(img_uid[B : 2 * B], uid)  # image kept, text negative
        assert torch.equal(txt_uid[2 * B :], uid)  # text kept, image negative
        assert (txt_uid[B : 2 * B] != uid).all() and (img_uid[2 * B :] != uid).all()
        pool = set(range(B)) | set(range(10, 10 + B))
        assert set(txt_uid.tolist()) <= pool and set(img_uid.tolist()) <= pool
        other = 10 * (1 - rank)
        seen_other_rank |= bool(
            ((img_uid[2 * B :] >= other) & (img_uid[2 * B :] < other + B)).any()
        )
        assert labels.tolist() == [1] * B + [0] * (2 * B)
    return {"seen_other_rank": seen_other_rank}


@pytest.mark.long(0.5)
def test_itm_negatives_gathered_across_two_processes(tmp_path):
    for rank, result in enumerate(run_two_ranks(_itm_pairs, tmp_path)):
        assert result["seen_other_rank"], f"rank {rank} never drew a negative from the other rank"


def _queue_steps(rank):
    """Two DDP steps of ITC + ITM with queued negatives; each sample's image is 10 * rank + k."""
    itc_itm = ["MODEL.COARSE.LOSSES", "['itc', 'itm']", "MODEL.COARSE.LOSS_WEIGHTS", "[1.0, 1.0]"]
    model = tiny_coarse(*itc_itm).train()
    ddp = DistributedDataParallel(model, device_ids=None, **model.ddp_kwargs)
    for step in range(2):
        records, _, _ = caption_batch()
        for k, r in enumerate(records):
            r["image"] = torch.full_like(r["image"], 100 * step + 10 * rank + k)
        sum(ddp(records).values()).backward()
    q = model.queue
    return {
        "images": q.image_input_queue[: q.filled, 0, 0, 0].tolist(),
        "ids": q.text_input_queue[: q.filled].tolist(),
        "features": q.image_queue[:, : q.filled].tolist(),
    }


@pytest.mark.long(0.5)
def test_the_itm_input_queue_holds_every_rank_samples_in_the_same_slots(tmp_path):
    """Each rank enqueues the inputs gathered over both, so the queues agree without DDP's buffer
    broadcast (they are left out of it)."""
    zero, one = run_two_ranks(_queue_steps, tmp_path)
    assert zero["images"] == [0, 1, 2, 3, 10, 11, 12, 13, 100, 101, 102, 103, 110, 111, 112, 113]
    assert zero == one
