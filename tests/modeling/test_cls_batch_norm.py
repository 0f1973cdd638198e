"""MODEL.COARSE.CLS_BATCH_NORM, the task models' switch for from-scratch towers: off (the original), a task
model computes exactly the fused ``cls_feats``; on, it standardises them over the batch with no new
parameters, so a coarse checkpoint still loads completely."""

import torch

from fiber_d2.checkpoint.checkpointer import load_model_weights
from fiber_d2.engine.setup import load_config
from fiber_d2.modeling.meta_arch import FIBERFusedTask
from fiber_d2.modeling.meta_arch.fiber_coarse import FIBERCoarse

SMALL = ["MODEL.SWIN.DEPTHS", "[2, 2, 2, 2]", "MODEL.FIBER.NUM_FUSION_LAYERS", "2"]
SMALL += ["INPUT.IMAGE_SIZE", "64", "MODEL.SWIN.WINDOW_SIZE", "2"]


def _cfg(*opts):
    return load_config("configs/Demo/coarse_tiny.yaml", [*SMALL, *opts])


def _task(*opts):
    torch.manual_seed(0)
    return FIBERFusedTask(**FIBERFusedTask.from_config(_cfg(*opts)))


def _inputs(b=4, t=9, size=64):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 900, (b, t), generator=g)
    ids[:, 0] = 0
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 6:] = 0
    ids[mask == 0] = 1
    images = torch.randn(b, 3, size, size, generator=g)
    return images, ids, mask


def test_off_by_default_and_exactly_the_fused_cls_feats():
    model = _task().eval()
    assert model.cls_bn is None
    assert not any(k.startswith("cls_bn") for k in model.state_dict())
    images, ids, mask = _inputs()
    with torch.no_grad():
        expected = model.fused(images, ids, mask)["cls_feats"]
        torch.testing.assert_close(model.cls_feats(images, ids, mask), expected, rtol=0, atol=0)


def test_on_standardises_over_the_batch_and_adds_no_parameters():
    plain, switched = _task(), _task("MODEL.COARSE.CLS_BATCH_NORM", "True")
    assert {n for n, _ in switched.named_parameters()} == {n for n, _ in plain.named_parameters()}
    extra = set(switched.state_dict()) - set(plain.state_dict())
    assert extra == {"cls_bn.running_mean", "cls_bn.running_var", "cls_bn.num_batches_tracked"}
    images, ids, mask = _inputs()
    switched.train()
    out = switched.cls_feats(images, ids, mask)
    raw = switched.fused(images, ids, mask)["cls_feats"].detach()
    # every dimension: zero mean over the batch and variance var / (var + eps), i.e. unit variance
    # wherever the batch varies by more than the tiny eps
    var = raw.var(0, unbiased=False)
    torch.testing.assert_close(out.mean(0), torch.zeros(out.shape[1]), rtol=0, atol=1e-4)
    torch.testing.assert_close(out.var(0, unbiased=False), var / (var + switched.cls_bn.eps))
    assert switched.cls_bn.eps <= 1e-9
    # the text half varies across texts by a tiny fraction of its size at init (the from-scratch
    # <s> problem); standardised, it reaches the head at the scale of the image half
    text = raw[:, : switched.text_dim]
    assert (text.std(0) / text.abs().mean(0)).median() < 0.05
    assert out[:, : switched.text_dim].std(0).median() > 0.5
    # the backward reaches the towers through it
    out.square().sum().backward()
    assert switched.cross_modal_text_pooler.dense.weight.grad.abs().sum() > 0
    # inference: the running statistics, not the batch's
    switched.eval()
    with torch.no_grad():
        bn = switched.cls_bn
        expected = (raw - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)
        torch.testing.assert_close(switched.cls_feats(images, ids, mask), expected)
        one = switched.cls_feats(images[:1], ids[:1], mask[:1])  # a batch of one works too
        torch.testing.assert_close(one, expected[:1])


def test_a_coarse_checkpoint_loads_completely_into_the_switched_task_model(tmp_path):
    torch.manual_seed(0)
    coarse = FIBERCoarse(_cfg())
    path = tmp_path / "coarse.pth"
    torch.save({"model": coarse.state_dict()}, path)
    cfg = _cfg("MODEL.COARSE.CLS_BATCH_NORM", "True", "MODEL.WEIGHTS", str(path))
    task = FIBERFusedTask(**FIBERFusedTask.from_config(cfg))
    load_model_weights(task, cfg)  # strict weights: an incomplete load would raise
    tower = "backbone.image_tower.layers.3.blocks.1.attn.qkv.weight"
    torch.testing.assert_close(task.state_dict()[tower], coarse.state_dict()[tower])
