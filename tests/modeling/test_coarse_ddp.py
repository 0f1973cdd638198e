"""Two gloo processes: ITM hard negatives come from the batch gathered over both ranks."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fiber_d2.engine.setup import load_config
from fiber_d2.modeling.meta_arch.fiber_coarse import FIBERCoarse

B = 3


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
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
        torch.save({"seen_other_rank": seen_other_rank}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_itm_negatives_gathered_across_two_processes(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert result["seen_other_rank"], f"rank {rank} never drew a negative from the other rank"
