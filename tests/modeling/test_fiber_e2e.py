"""The FIBER detector end to end on hand-built inputs: odd sizes, empty images, unmatched prompts."""

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from fiber_d2.engine.setup import load_config

T = 16


@pytest.fixture(scope="module")
def model():
    cfg = load_config(
        "configs/Demo/fine_tiny.yaml",
        [
            "MODEL.SWIN.DEPTHS",
            "[2, 2, 2, 2]",
            "MODEL.FIBER.NUM_FUSION_LAYERS",
            "2",
            "MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN",
            str(T),
        ],
    )
    torch.manual_seed(0)
    return build_model(cfg)


def _sample(h, w, boxes, token_rows, num_labels=3):
    ids = torch.ones(T, dtype=torch.long)  # pad id 1
    ids[:6] = torch.tensor([0, 10, 11, 12, 13, 2])
    mask = (ids != 1).long()
    inst = Instances((h, w))
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.zeros(len(boxes), dtype=torch.long)
    pmap = torch.zeros(len(boxes), T, dtype=torch.bool)
    for i, row in enumerate(token_rows):
        pmap[i, row] = True
    inst.gt_positive_map = pmap
    label_map = torch.zeros(num_labels, T, dtype=torch.bool)
    label_map[0, 1:3] = True
    label_map[1, 3] = True
    label_map[2, 4] = True
    return {
        "image": torch.randint(0, 255, (3, h, w), dtype=torch.uint8),
        "height": h * 2,
        "width": w * 2,  # original size: twice the network input
        "input_ids": ids,
        "attention_mask": mask,
        "instances": inst,
        "label_token_map": label_map,
    }


def test_train_with_odd_sizes_and_an_empty_image(model):
    model.train()
    batch = [
        _sample(97, 131, [[10, 12, 40, 50], [60, 20, 90, 70]], [[1, 2], [4]]),
        _sample(75, 61, [], []),  # no boxes
    ]
    losses = model(batch)
    assert set(losses) == {"loss_dot_product_token", "loss_reg", "loss_centerness"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    # one image of two is empty (> MAX_NEG_PER_BATCH): the batch is kept but contributes nothing
    assert all(torch.count_nonzero(g) == 0 for g in grads)
    model.zero_grad()
    losses = model([batch[0], _sample(64, 64, [[5, 5, 30, 30]], [[3]])])
    sum(losses.values()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_a_prompt_without_boxes_in_training_mode_says_to_call_eval(model):
    """build_model returns a model in training mode; called for inference it asked for
    'instances' without saying why."""
    model.train()
    sample = _sample(64, 64, [], [])
    del sample["instances"]
    with pytest.raises(ValueError, match=r"training inputs need 'instances'.*call model\.eval\(\)"):
        model([sample])


def test_inference_returns_instances_at_the_original_size(model):
    model.eval()
    batch = [_sample(97, 131, [], []), _sample(75, 61, [], [])]
    outputs = model(batch)
    assert len(outputs) == 2
    for out, x in zip(outputs, batch):
        inst = out["instances"]
        assert inst.image_size == (x["height"], x["width"])
        b = inst.pred_boxes.tensor
        assert (
            (b[:, 0] >= 0).all()
            and (b[:, 2] <= x["width"]).all()
            and (b[:, 3] <= x["height"]).all()
        )
        assert ((inst.pred_classes >= 0) & (inst.pred_classes < 3)).all()
        assert (inst.scores >= 0).all() and (inst.scores <= 1).all()


def test_label_without_tokens_is_never_predicted(model):
    model.eval()
    x = _sample(64, 96, [], [])
    x["label_token_map"][1] = False  # label 1 matches no token of the prompt
    model.score_threshold = 0.0
    try:
        inst = model([x])[0]["instances"]
    finally:
        model.score_threshold = 0.05
    assert len(inst) > 0 and not (inst.pred_classes == 1).any()


def test_chunked_prompts_pool_detections(model):
    model.eval()
    x = _sample(64, 96, [], [])
    x["input_ids"] = torch.stack([x["input_ids"], x["input_ids"]])
    x["attention_mask"] = torch.stack([x["attention_mask"], x["attention_mask"]])
    maps = torch.zeros(2, 3, T, dtype=torch.bool)
    maps[0, 0, 1:3] = True  # chunk 0 holds label 0
    maps[1, 2, 4] = True  # chunk 1 holds label 2
    x["label_token_map"] = maps
    model.score_threshold = 0.0
    try:
        inst = model([x])[0]["instances"]
    finally:
        model.score_threshold = 0.05
    assert set(inst.pred_classes.tolist()) == {0, 2}


def test_the_fpn_may_start_at_res2():
    """MODEL.FPN.IN_FEATURES with res2 (stride 4) adds a P2 level; the detector used to feed the head
    a fixed p3..p7 and failed in its first forward ("expected 6 feature levels, got 5")."""
    cfg = load_config(
        "configs/Demo/fine_tiny.yaml",
        [
            *("MODEL.SWIN.DEPTHS", "[2, 2, 2, 2]", "MODEL.FIBER.NUM_FUSION_LAYERS", "2"),
            *("MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN", str(T)),
            *("MODEL.FPN.IN_FEATURES", "['res2', 'res3', 'res4', 'res5']"),
            *("MODEL.ATSS.ANCHOR_SIZES", "[16, 32, 64, 128, 256, 512]"),
            *("MODEL.ATSS.ANCHOR_STRIDES", "[4, 8, 16, 32, 64, 128]"),
        ],
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    assert model.in_features == ["p2", "p3", "p4", "p5", "p6", "p7"]
    losses = model([_sample(64, 96, [[10, 12, 40, 50]], [[1, 2]])])
    assert torch.isfinite(sum(losses.values()))
    model.eval()
    with torch.no_grad():
        (result,) = model([_sample(64, 96, [], [])])
    assert result["instances"].image_size == (128, 192)  # the original size, twice the input


def test_training_targets_are_the_legacy_boxes_of_the_instances(model, monkeypatch):
    """The loss gets the ground truth in the legacy "+1" convention (spec 3.3): detectron2's
    x2 = x + w becomes x2 = x + w - 1 (y2 likewise), and the positive maps have the
    batch's text length."""
    model.train()
    seen = []
    loss = model.loss

    def spy(anchors, outputs, targets, mask):
        seen.append((targets, mask.shape[1]))
        return loss(anchors, outputs, targets, mask)

    monkeypatch.setattr(model, "loss", spy)
    boxes = [[10.0, 12.0, 40.0, 50.0], [60.0, 20.0, 90.0, 70.0]]
    sample = _sample(97, 131, boxes, [[1, 2], [4]])
    with torch.no_grad():
        model([sample])
    ((targets, length),) = seen
    want = torch.tensor(boxes) - torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert torch.equal(targets[0]["gt_boxes"].cpu(), want)
    assert torch.equal(
        targets[0]["positive_map"].cpu(), sample["instances"].gt_positive_map[:, :length]
    )


def test_a_batch_is_skipped_only_when_more_than_the_allowed_share_of_images_is_empty(model):
    """SOLVER.MAX_NEG_PER_BATCH (spec 3.5): a batch is skipped when more than that share of its
    images have no boxes, or all of them; exactly that share is kept."""
    model.train()
    full = _sample(64, 64, [[5, 5, 30, 30]], [[3]])
    empty = _sample(64, 64, [], [])
    limit = model.max_neg_per_batch
    model.max_neg_per_batch = 0.5
    try:
        for batch, skipped in (
            ([full, full], False),
            ([full, empty], False),  # 1 of 2: the limit itself
            ([full, empty, empty], True),  # 2 of 3
            ([empty, empty], True),
        ):
            with torch.no_grad():
                losses = model(batch)
            assert model.batch_skipped is skipped, len(batch)
            assert all((v == 0).item() for v in losses.values()) is skipped
    finally:
        model.max_neg_per_batch = limit


def test_detections_are_clipped_to_the_image_not_to_its_padding(model):
    """Boxes live in the frame of the unpadded network input (75 x 61 here, padded to 96 x 64)."""
    model.eval()
    x = _sample(75, 61, [], [])
    images = model.preprocess_image([x])
    assert tuple(images.tensor.shape[-2:]) == (96, 64)
    ids, mask = x["input_ids"][None], x["attention_mask"][None]
    threshold, model.score_threshold = model.score_threshold, 0.0  # keep every candidate
    try:
        with torch.no_grad():
            (result,) = model._detect(images, ids, mask, [x["label_token_map"]])
            (chunk,) = model.detect_chunks(images, ids, mask, x["label_token_map"][None])
    finally:
        model.score_threshold = threshold
    for inst in (result, chunk):
        assert inst.image_size == (75, 61)
        b = inst.pred_boxes.tensor
        assert len(b) and (b[:, 2] <= 61 - 1).all() and (b[:, 3] <= 75 - 1).all()
