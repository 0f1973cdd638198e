"""FIBERPredictor: outputs at odd image sizes, label maps, batching, chunking, weights, bad input.

A randomly initialised tiny detector (configs/Demo/fine_tiny.yaml with fewer blocks and tiny test
images); ``INFERENCE_TH 0`` makes every candidate a detection so the outputs are never trivially empty.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_detector import tiny_detector_opts

import fiber_d2  # noqa: F401
from fiber_d2.checkpoint.checkpointer import FIBERCheckpointer
from fiber_d2.engine.setup import load_config
from fiber_d2.predictor import FIBERPredictor, split_prompt
from fiber_d2.text import build_prompt, char_spans_to_positive_map, tokenize

ROOT = Path(__file__).resolve().parents[1]
FINE_CFG = str(ROOT / "configs/Demo/fine_tiny.yaml")
COARSE_CFG = str(ROOT / "configs/Demo/coarse_tiny.yaml")
TINY = tiny_detector_opts()
CAPTION = "a red circle left of a blue square"
NAMES = ["red circle", "blue square", "green triangle"]


@pytest.fixture(scope="module")
def predictor():
    torch.manual_seed(0)
    return FIBERPredictor(load_config(FINE_CFG, TINY))


def _image(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _check_output(out, height, width, num_labels):
    assert set(out) >= {"instances", "label_names"}
    inst = out["instances"]
    assert inst.image_size == (height, width)
    assert {"pred_boxes", "scores", "pred_classes"} <= set(inst.get_fields())
    assert len(out["label_names"]) == num_labels
    assert len(inst) > 0  # INFERENCE_TH 0: every image gets detections
    boxes = inst.pred_boxes.tensor
    assert torch.isfinite(boxes).all()
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    # the original's arithmetic (the legacy box clipped to the input's last pixel, scaled, then +1)
    # can end less than a pixel beyond the image (FIBER's to_image_frame)
    assert (boxes[:, 2] < width + 1).all() and (boxes[:, 3] < height + 1).all()
    assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
    assert ((inst.scores > 0) & (inst.scores <= 1)).all()
    assert ((inst.pred_classes >= 0) & (inst.pred_classes < num_labels)).all()


def _token_text(tokenizer, enc, row):
    return tokenizer.decode(enc["input_ids"][..., row.nonzero()[:, 0]].reshape(-1)).strip()


# ------------------------------------------------------------------ text side (no forward pass)
def test_split_prompt():
    assert split_prompt("red circle. blue square") == ["red circle", "blue square"]
    assert split_prompt(" red circle.  blue square. ") == ["red circle", "blue square"]
    assert split_prompt("red circle. blue square.") == ["red circle", "blue square"]
    with pytest.raises(ValueError, match="no category name"):
        split_prompt(" . ")


def test_category_label_map_matches_text_functions(predictor):
    tok, T = predictor.tokenizer, predictor.max_query_len
    enc = predictor.encode(NAMES)
    caption, spans = build_prompt(NAMES, ". ")
    assert enc["caption"] == "red circle. blue square. green triangle"
    assert enc["label_names"] == NAMES
    ref = tokenize(tok, caption, T)
    assert torch.equal(enc["input_ids"], ref["input_ids"][0])
    assert torch.equal(enc["attention_mask"], ref["attention_mask"][0])
    expected = char_spans_to_positive_map(ref, [[s] for s in spans], T)
    assert enc["label_token_map"].shape == (len(NAMES), T)
    assert torch.equal(enc["label_token_map"], expected)
    for row, name in zip(enc["label_token_map"], NAMES):  # independent: the tokens spell the name
        assert _token_text(tok, enc, row) == name
    rows = enc["label_token_map"].nonzero()[:, 1]
    assert len(set(rows.tolist())) == len(rows)  # labels never share a token


def test_caption_label_map_spans_and_substrings(predictor):
    tok, T = predictor.tokenizer, predictor.max_query_len
    spans = [(2, 12), (23, 34)]
    by_span = predictor.encode(CAPTION, phrases=spans)
    by_text = predictor.encode(CAPTION, phrases=["red circle", "blue square"])
    assert by_span["label_names"] == by_text["label_names"] == ["red circle", "blue square"]
    assert torch.equal(by_span["label_token_map"], by_text["label_token_map"])
    ref = tokenize(tok, CAPTION, T)
    expected = char_spans_to_positive_map(ref, [[list(s)] for s in spans], T)
    assert torch.equal(by_span["label_token_map"], expected)
    assert torch.equal(by_span["input_ids"], ref["input_ids"][0])
    for row, name in zip(by_span["label_token_map"], ["red circle", "blue square"]):
        assert _token_text(tok, by_span, row) == name

    whole = predictor.encode(CAPTION)  # no phrases: one label = every real token of the caption
    assert whole["label_names"] == [CAPTION]
    ids = whole["input_ids"]
    real = (whole["attention_mask"] > 0) & ~torch.isin(ids, torch.tensor(tok.all_special_ids))
    assert torch.equal(whole["label_token_map"], real[None])

    repeated = predictor.encode("a circle and a circle", phrases=["circle", "circle"])
    first, second = repeated["label_token_map"]
    assert first.any() and second.any() and not (first & second).any()


def test_long_category_list_is_chunked_by_token_budget(predictor):
    tok, T = predictor.tokenizer, predictor.max_query_len
    names = [
        f"{c} {s}" for c in ("red", "green", "blue", "yellow") for s in ("circle", "square")
    ] * 4
    assert len(tok.tokenize(build_prompt(names)[0])) > T - 2  # does not fit in one prompt
    enc = predictor.encode(names)
    k = enc["input_ids"].shape[0]
    assert enc["input_ids"].shape == enc["attention_mask"].shape == (k, T) and k >= 2
    assert enc["label_token_map"].shape == (k, len(names), T)
    # every label lives in exactly one chunk, where its tokens spell its name
    owners = enc["label_token_map"].any(dim=2)
    assert (owners.sum(dim=0) == 1).all()
    for label, name in enumerate(names):
        chunk = int(owners[:, label].nonzero())
        row = enc["label_token_map"][chunk, label]
        assert tok.decode(enc["input_ids"][chunk][row]).strip() == name
        assert name in enc["caption"][chunk]
    assert all(len(tok.tokenize(c)) <= T - 2 for c in enc["caption"])


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "prompt,phrases,needle",
    [
        (CAPTION, ["purple star"], "purple star"),
        (CAPTION, [(23, 35)], r"\[23, 35\) is outside the caption"),
        (CAPTION, [(3, 2)], "outside the caption"),
        (CAPTION, [], "non-empty list"),
        (CAPTION, ["  "], "phrase 0 is empty"),
        ("", None, "empty prompt"),
        ("   ", None, "empty prompt"),
        ([], None, "empty prompt"),
        (["red circle", " "], None, "entry 1"),
        ([1, 2], None, r"prompt entry 0 is not a name \(str\): 1"),  # was "empty prompt entry"
        ([["red circle", "blue square"]], None, "prompt entry 0 is not a name"),  # a TypeError
        (NAMES, ["red circle"], "only accepted with a caption"),
        (" ".join(["circle"] * 70), None, "MAX_QUERY_LEN 64"),
    ],
)
def test_bad_prompts_raise_clear_errors(predictor, prompt, phrases, needle):
    with pytest.raises(ValueError, match=needle):
        predictor(_image(8, 8, 0), prompt, phrases=phrases)


def test_bad_images_and_batches_raise(predictor, tmp_path):
    with pytest.raises(ValueError, match="BGR uint8"):
        predictor(np.zeros((8, 8, 2), np.uint8), NAMES)  # grayscale (8, 8) is accepted
    with pytest.raises(ValueError, match="BGR uint8"):
        predictor(np.zeros((8, 8, 3), np.float32), NAMES)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        predictor(str(tmp_path / "nope.png"), NAMES)
    with pytest.raises(ValueError, match="2 images need 2 prompts"):
        predictor([_image(8, 8, 0), _image(8, 8, 1)], [NAMES])
    two = [_image(8, 8, 0), _image(8, 8, 1)]
    # a batch's phrases: a TypeError for 5, and "ca" was split into phrase lists "c" and "a"
    for phrases in (5, "ca"):
        with pytest.raises(ValueError, match="phrases of a batch must be a list of 2 phrase lists"):
            predictor(two, CAPTION, phrases=phrases)


def test_coarse_config_and_missing_weights_raise(tmp_path):
    with pytest.raises(ValueError, match="'FIBERCoarse' does not predict boxes"):
        FIBERPredictor(load_config(COARSE_CFG, ["MODEL.DEVICE", "cpu"]))
    missing = str(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        FIBERPredictor(load_config(FINE_CFG, [*TINY, "MODEL.WEIGHTS", missing]))


def test_model_weights_are_loaded(predictor, tmp_path):
    FIBERCheckpointer(predictor.model, save_dir=str(tmp_path)).save("tiny")
    torch.manual_seed(123)  # a different initialisation, replaced by the checkpoint
    loaded = FIBERPredictor(
        load_config(FINE_CFG, [*TINY, "MODEL.WEIGHTS", str(tmp_path / "tiny.pth")])
    )
    assert not loaded.model.training
    ref = predictor.model.state_dict()
    got = loaded.model.state_dict()
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)


# ------------------------------------------------------------------ forward passes
def test_odd_sizes_paths_and_batching(predictor, tmp_path, monkeypatch):
    a, b, c = _image(97, 131, 1), _image(97, 131, 2), _image(41, 53, 3)
    path = tmp_path / "c.png"
    Image.fromarray(c[:, :, ::-1]).save(path)  # file holds the same BGR pixels, stored as RGB

    single_a = predictor(a, NAMES)
    _check_output(single_a, 97, 131, 3)
    assert single_a["caption"] == "red circle. blue square. green triangle"
    single_b = predictor(b, CAPTION, phrases=[(2, 12), (23, 34)])
    _check_output(single_b, 97, 131, 2)
    assert single_b["label_names"] == ["red circle", "blue square"]
    from_path = predictor(str(path), CAPTION)
    _check_output(from_path, 41, 53, 1)
    # a path is read as the same BGR pixels; resized to the test size (shortest edge 64; the long
    # side truncated as in the original, 82.7 -> 82, where detectron2 rounds)
    x_path, x_array = predictor.preprocess_image(str(path)), predictor.preprocess_image(c)
    assert torch.equal(x_path["image"], x_array["image"])
    assert (x_path["height"], x_path["width"]) == (41, 53)
    assert x_path["image"].shape == (3, 64, 82)

    calls = []
    forward = predictor.model.forward
    monkeypatch.setattr(
        predictor.model, "forward", lambda inputs: calls.append(len(inputs)) or forward(inputs)
    )
    batched = predictor([a, b], [NAMES, CAPTION], phrases=[None, [(2, 12), (23, 34)]])
    assert calls == [2]  # one forward pass over the batch
    for one, many in zip([single_a, single_b], batched):
        assert many["label_names"] == one["label_names"]
        i, j = one["instances"], many["instances"]
        assert len(i) == len(j)
        assert torch.equal(i.pred_classes, j.pred_classes)
        torch.testing.assert_close(j.scores, i.scores, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(j.pred_boxes.tensor, i.pred_boxes.tensor, atol=1e-3, rtol=1e-4)


def test_prompt_matching_nothing_gives_empty_instances(predictor, monkeypatch):
    monkeypatch.setattr(predictor.model, "score_threshold", 0.99)  # nothing scores that high
    out = predictor(_image(45, 67, 4), "zebra xylophone quartz")
    inst = out["instances"]
    assert len(inst) == 0 and inst.image_size == (45, 67)
    assert inst.pred_boxes.tensor.shape == (0, 4)
    assert inst.scores.shape == (0,) and inst.pred_classes.shape == (0,)


def test_chunked_prompt_equals_one_call_per_chunk(predictor):
    chunked = FIBERPredictor(
        model=predictor.model,
        tokenizer=predictor.tokenizer,
        min_size_test=64,
        max_size_test=96,
        max_query_len=predictor.max_query_len,
        chunk_size=2,
    )
    image = _image(50, 77, 5)
    out = chunked(image, NAMES)  # chunks [0, 1] and [2]
    assert chunked.encode(NAMES)["input_ids"].shape[0] == 2
    inst = out["instances"]
    assert out["label_names"] == NAMES and inst.image_size == (50, 77)
    for labels in ([0, 1], [2]):
        ref = predictor(image, [NAMES[i] for i in labels])["instances"]
        mine = inst[torch.isin(inst.pred_classes, torch.tensor(labels))]
        assert len(mine) == len(ref) > 0
        order_ref, order_mine = ref.scores.argsort(), mine.scores.argsort()
        torch.testing.assert_close(mine.scores[order_mine], ref.scores[order_ref])
        assert torch.equal(mine.pred_classes[order_mine], ref.pred_classes[order_ref] + labels[0])


def test_rgb_models_get_flipped_channels_and_non_detectors_are_rejected(predictor):
    rgb = FIBERPredictor(
        model=predictor.model, tokenizer=predictor.tokenizer, min_size_test=8, max_size_test=8,
        input_format="RGB",
    )  # fmt: skip
    image = _image(8, 8, 6)
    assert torch.equal(
        rgb.preprocess_image(image)["image"],
        torch.as_tensor(image[:, :, ::-1].copy()).permute(2, 0, 1),
    )
    with pytest.raises(ValueError, match="needs a FIBER detector, got Linear"):
        FIBERPredictor(model=torch.nn.Linear(1, 1), tokenizer=predictor.tokenizer)
