"""Two gloo processes: ITM hard negatives come from the batch gathered over both ranks."""

import pytest
import torch
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
