"""Dynamic text length: a batch cut to its longest prompt (rounded up to 8) gives the outputs of the
same batch padded to MAX_QUERY_LEN on every real token: both cross-attentions, the token logits, the
label / positive maps, the detections, the detector losses and gradients, and the coarse ITC / ITM /
MLM losses."""

import copy

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from fiber_d2.engine.setup import load_config
from fiber_d2.text import TEXT_LENGTH_MULTIPLE, padded_text_length, trim_text

T = 64  # MAX_QUERY_LEN of the tests; the prompts below use at most 19 tokens -> T' = 24
LENGTHS = (11, 19)
TOL = dict(atol=1e-5, rtol=1e-5)
NO_RANDOMNESS = [
    "MODEL.LANGUAGE_BACKBONE.HIDDEN_DROPOUT",
    "0.0",
    "MODEL.LANGUAGE_BACKBONE.ATTENTION_DROPOUT",
    "0.0",
    "MODEL.SWIN.DROP_PATH_RATE",
    "0.0",
]
SMALL = ["MODEL.SWIN.DEPTHS", "[2, 2, 2, 2]", "MODEL.FIBER.NUM_FUSION_LAYERS", "2"]


def _ids(length: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.ones(T, dtype=torch.long)  # pad id 1
    ids[0], ids[length - 1] = 0, 2
    ids[1 : length - 1] = torch.randint(5, 60, (length - 2,), generator=generator)
    return ids, (ids != 1).long()


def test_padded_text_length_is_the_longest_prompt_rounded_up():
    mask = torch.zeros(3, 40, dtype=torch.long)
    mask[0, :5], mask[1, :17], mask[2, :3] = 1, 1, 1
    assert TEXT_LENGTH_MULTIPLE == 8
    assert padded_text_length(mask) == 24
    assert padded_text_length(mask, pad_to_max=True) == 40
    mask[1, :] = 1
    assert padded_text_length(mask) == 40  # never beyond the tokenized length
    assert padded_text_length(torch.zeros(2, 12, dtype=torch.long)) == 8  # all padding
    assert padded_text_length(torch.ones(2, 3, 10)) == 10  # (B, K, T) chunked masks
    ids, pmap = torch.arange(40).expand(2, -1), torch.ones(4, 40, dtype=torch.bool)
    cut_ids, cut_map, none = trim_text(24, ids, pmap, None)
    assert cut_ids.shape == (2, 24) and cut_map.shape == (4, 24) and none is None


@pytest.fixture(scope="module")
def detector():
    cfg = load_config(
        "configs/Demo/fine_tiny.yaml",
        SMALL + NO_RANDOMNESS + ["MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN", str(T)],
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # a visible text influence: make the fusion gates non-zero
        for name, p in model.named_parameters():
            if name.endswith(("gamma", "alpha_t2i", "alpha_i2t")) or "gamma" in name:
                p.add_(0.5)
    return model


def _detector_batch(with_instances: bool, lengths=LENGTHS) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    batch = []
    for length, (h, w) in zip(lengths, [(96, 128), (80, 112)]):
        ids, mask = _ids(length, g)
        label_map = torch.zeros(3, T, dtype=torch.bool)
        label_map[0, 1:3], label_map[1, 3], label_map[2, 4 : length - 1] = True, True, True
        record = dict(
            image=torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8),
            height=h,
            width=w,
            input_ids=ids,
            attention_mask=mask,
            label_token_map=label_map,
        )
        if with_instances:
            inst = Instances((h, w))
            inst.gt_boxes = Boxes(torch.tensor([[10.0, 12.0, 60.0, 70.0], [30.0, 5.0, 90.0, 50.0]]))
            inst.gt_classes = torch.tensor([0, 2])
            inst.gt_positive_map = label_map[inst.gt_classes]
            record["instances"] = inst
        batch.append(record)
    return batch


def _capture(model):
    captured = {}
    hooks = [
        model.backbone.register_forward_hook(lambda m, i, o: captured.update(backbone=o)),
        model.head.register_forward_hook(lambda m, i, o: captured.update(head=o)),
    ]
    return captured, hooks


def _run_detector(model, pad_to_max: bool, train: bool, lengths=LENGTHS):
    model.pad_to_max_query_len = pad_to_max
    model.train(train)
    captured, hooks = _capture(model)
    try:
        if train:
            model.zero_grad(set_to_none=True)
            losses = model(_detector_batch(True, lengths))
            sum(losses.values()).backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            return captured, losses, grads
        model.score_threshold = 0.0
        return captured, model(_detector_batch(False)), None
    finally:
        model.score_threshold = 0.05
        for h in hooks:
            h.remove()


def _assert_real_tokens_equal(full: dict, cut: dict, length: int, lengths=LENGTHS):
    (feats_f, text_f), (feats_c, text_c) = full["backbone"], cut["backbone"]
    assert text_f["hidden"].shape[1] == T and text_c["hidden"].shape[1] == length
    for level in feats_f:  # image side: image-to-text cross-attention masks the padding
        torch.testing.assert_close(feats_c[level], feats_f[level], **TOL)
    for i, n in enumerate(lengths):  # text side, every real token
        torch.testing.assert_close(text_c["hidden"][i, :n], text_f["hidden"][i, :n], **TOL)
        torch.testing.assert_close(text_c["embedded"][i], text_f["embedded"][i, :length], **TOL)
    head_f, head_c = full["head"], cut["head"]
    for key in ("box_regression", "centerness"):
        for a, b in zip(head_c[key], head_f[key]):
            torch.testing.assert_close(a, b, **TOL)
    for a, b in zip(head_c["token_logits"], head_f["token_logits"]):
        assert a.shape[-1] == length
        torch.testing.assert_close(a, b[..., :length], **TOL)


def test_detector_inference_is_equal_on_the_real_tokens(detector):
    full, out_f, _ = _run_detector(detector, pad_to_max=True, train=False)
    cut, out_c, _ = _run_detector(detector, pad_to_max=False, train=False)
    length = -(-max(LENGTHS) // 8) * 8
    _assert_real_tokens_equal(full, cut, length)
    for a, b in zip(out_c, out_f):  # label maps cut with the text: the same detections
        a, b = a["instances"], b["instances"]
        assert len(a) == len(b) > 0
        torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor, atol=1e-4, rtol=0)
        torch.testing.assert_close(a.scores, b.scores, **TOL)
        assert torch.equal(a.pred_classes, b.pred_classes)


# (11, 24): the longest prompt fills the cut batch, whose last column is then its real "</s>",
# not the padding column T - 1 where the original marks unmatched anchors
@pytest.mark.parametrize("lengths", [LENGTHS, (11, 24)])
def test_detector_losses_and_gradients_are_equal(detector, lengths):
    full, losses_f, grads_f = _run_detector(detector, pad_to_max=True, train=True, lengths=lengths)
    cut, losses_c, grads_c = _run_detector(detector, pad_to_max=False, train=True, lengths=lengths)
    _assert_real_tokens_equal(full, cut, -(-max(lengths) // 8) * 8, lengths)
    assert losses_f["loss_dot_product_token"] > 0  # positive maps were cut, not emptied
    for k in losses_f:
        torch.testing.assert_close(losses_c[k], losses_f[k], **TOL)
    assert grads_f.keys() == grads_c.keys()
    for name in grads_f:
        torch.testing.assert_close(grads_c[name], grads_f[name], atol=1e-5, rtol=1e-4, msg=name)


def _coarse_batch(generator: torch.Generator, size: int) -> list[dict]:
    from fiber_d2.text import mask_tokens_for_mlm

    class Vocab:  # what mask_tokens_for_mlm reads from a tokenizer
        mask_token_id, all_special_ids = 4, [0, 1, 2, 3, 4]

        def __len__(self):
            return 60

    batch = []
    for length in LENGTHS + (7,):
        ids, mask = _ids(length, generator)
        masked, labels = mask_tokens_for_mlm(ids, Vocab(), 0.3, generator)
        image = torch.randint(0, 256, (3, size, size), generator=generator, dtype=torch.uint8)
        batch.append(dict(image=image, height=size, width=size, input_ids=ids, attention_mask=mask))
        batch[-1].update(mlm_input_ids=masked, mlm_labels=labels)
    return batch


def test_coarse_itc_itm_mlm_losses_and_retrieval_embeddings_are_equal():
    cfg = load_config(
        "configs/Demo/coarse_tiny.yaml",
        SMALL + NO_RANDOMNESS + ["MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN", str(T)],
    )
    torch.manual_seed(0)
    base = build_model(cfg)
    batch = _coarse_batch(torch.Generator().manual_seed(2), cfg.INPUT.IMAGE_SIZE)
    assert any((x["mlm_labels"] != -100).any() for x in batch)
    results = []
    for pad_to_max in (True, False):
        model = copy.deepcopy(base)  # the ITC queue changes with every step
        model.pad_to_max_query_len = pad_to_max
        model.train()
        torch.manual_seed(3)  # the same ITM hard negatives
        losses = model(batch)
        sum(losses.values()).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        model.eval()
        records = [dict(x, input_ids=x["input_ids"][None].repeat(2, 1)) for x in batch]
        for r, x in zip(records, batch):
            r["attention_mask"] = x["attention_mask"][None].repeat(2, 1)
        embeddings = [o["text_embeddings"] for o in model(records)]
        results.append((losses, grads, embeddings))
    (losses_f, grads_f, emb_f), (losses_c, grads_c, emb_c) = results
    assert set(losses_f) == {"loss_itc", "loss_itm", "loss_mlm"}
    for k in losses_f:
        torch.testing.assert_close(losses_c[k], losses_f[k], **TOL)
    for name in grads_f:
        torch.testing.assert_close(grads_c[name], grads_f[name], atol=1e-5, rtol=1e-4, msg=name)
    for a, b in zip(emb_c, emb_f):
        torch.testing.assert_close(a, b, **TOL)
