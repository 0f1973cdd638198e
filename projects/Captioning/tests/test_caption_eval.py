"""CIDEr-D rewards with training document frequencies, the caption metrics and the evaluator."""

import json
import logging
import math

import numpy as np
import pytest
from captioning import (
    CaptionEvaluator,
    CiderD,
    attach_references,
    build_document_frequency,
    caption_metrics,
    metric_availability,
    normalise_caption,
    references_by_image,
)

from fiber_d2.data.datasets.common import BadRecordError

TRAIN = [
    {"dataset_name": "d", "image_id": 1, "caption": "a red circle."},
    {"dataset_name": "d", "image_id": 1, "caption": "a red circle left of a blue square"},
    {"dataset_name": "d", "image_id": 2, "caption": "a blue square"},
    {"dataset_name": "d", "image_id": 3, "caption": "a green triangle above a red circle"},
]


def test_document_frequencies_count_images_not_captions():
    refs = references_by_image(TRAIN)
    assert refs[("d", 1)] == ["a red circle.", "a red circle left of a blue square"]
    df, log_images = build_document_frequency(refs)
    assert log_images == pytest.approx(math.log(3))
    assert df[("a",)] == 3  # in every image, counted once per image
    assert df[("red", "circle")] == 2  # images 1 and 3
    assert df[("circle", "<eos>")] == 2  # normalisation: trailing "." dropped, " <eos>" appended
    assert ("circle.",) not in df
    assert normalise_caption(" a cat. ") == "a cat <eos>"
    assert normalise_caption("a cat..") == "a cat. <eos>"  # only one trailing "." is dropped
    with pytest.raises(ValueError, match="no training image"):
        build_document_frequency({("d", 9): []})


def test_cider_d_rewards():
    scorer = CiderD.from_references(references_by_image(TRAIN))
    refs = [["a red circle left of a blue square", "a red circle"]] * 3
    scores = scorer.scores(
        ["a red circle left of a blue square", "a blue square", "zebra zebra zebra"], refs
    )
    assert scores[0] > scores[1] > scores[2] and scores[2] == 0.0
    # frequencies are those of the training set, not of the scored batch: one candidate alone
    # scores the same as inside a batch
    alone = scorer.scores(["a blue square"], refs[:1])
    assert alone[0] == pytest.approx(scores[1])
    with pytest.raises(ValueError, match="no reference"):
        scorer.scores(["a blue square"], [[]])


def test_cider_d_by_hand():
    """CIDEr-D (n = 4, sigma = 6, x10) of one candidate, computed by hand from the definition.

    Training: two images whose n-grams the candidate never uses, so every candidate / reference
    n-gram has document frequency <= 1 and weight log(2) - log(1) = log(2), except the unigram
    "<eos>" (in both images: weight log(2) - log(2) = 0). With equal weights the cosine of each
    n-gram order is that of the plain (clipped) counts.
    """
    scorer = CiderD.from_references({1: ["x y z"], 2: ["p q r"]})
    # candidate "a b c d <eos>" against reference "a b c <eos>":
    # 1-grams: a b c d vs a b c -> 3 / (2 * sqrt(3)); 2-grams: ab bc cd d<eos> vs ab bc c<eos>
    # -> 2 / (2 * sqrt(3)); 3-grams: abc bcd cd<eos> vs abc bc<eos> -> 1 / (sqrt(3) * sqrt(2));
    # 4-grams: abcd bcd<eos> vs abc<eos> -> 0. Length 5 vs 4 words: penalty exp(-1 / (2 * 6^2)).
    cosines = [3 / (2 * math.sqrt(3)), 2 / (2 * math.sqrt(3)), 1 / math.sqrt(6), 0.0]
    shorter_ref = 10 * sum(cosines) / 4 * math.exp(-1 / 72)
    (got,) = scorer.scores(["a b c d."], [["a b c."]])
    assert got == pytest.approx(shorter_ref, rel=1e-9)
    # an identical reference: cosine 1 for every order, no penalty -> 10; references are averaged
    (both,) = scorer.scores(["a b c d."], [["a b c.", "a b c d"]])
    assert both == pytest.approx((shorter_ref + 10.0) / 2, rel=1e-9)


def test_training_records_carry_every_caption_of_their_image():
    records = attach_references(TRAIN)
    assert records[0]["references"] == records[1]["references"]
    assert len(records[0]["references"]) == 2 and records[2]["references"] == ["a blue square"]


def test_caption_metrics_and_skips():
    refs = {1: ["a red circle left of a blue square", "a red circle"], 2: ["a green triangle"]}
    perfect, skipped = caption_metrics(
        refs, {1: "a red circle left of a blue square", 2: "a green triangle"}, ["BLEU", "CIDEr"]
    )
    poor, _ = caption_metrics(refs, {1: "a green triangle", 2: "a red circle"}, ["BLEU", "CIDEr"])
    assert set(perfect) == {"BLEU-4", "CIDEr"} and skipped == {}
    assert perfect["CIDEr"] > poor["CIDEr"] and perfect["BLEU-4"] > poor["BLEU-4"]
    with pytest.raises(ValueError, match="image 2"):
        caption_metrics({1: ["a"], 2: []}, {1: "a", 2: "b"}, ["BLEU"])
    with pytest.raises(ValueError, match="unknown"):
        metric_availability(["ROUGE-9"])
    run, skipped = metric_availability(["BLEU", "SPICE"])
    assert "BLEU" in run and ("SPICE" in run) != ("SPICE" in skipped)


# BLEU-4 of "the cat sat on a mat" against "the cat sat on the mat" (test_caption_metrics_by_hand)
HAND_BLEU4 = 100 * (1 / 12) ** 0.25


def test_caption_metrics_by_hand():
    """BLEU-4 and CIDEr (x100) of small corpora, computed by hand from their definitions.

    BLEU-4: "the cat sat on a mat" against "the cat sat on the mat" (same length: no brevity
    penalty): clipped n-gram precisions 5/6, 3/5, 2/4, 1/3, geometric mean (1/12)^(1/4); the
    reference "zebra" adds no match and is not the closest length. CIDEr (coco-caption's, CIDEr-D:
    document frequencies over the scored references, x10 per image, averaged over images): an
    image captioned exactly as its only reference, with no n-gram in common with the other image,
    scores cosine 1 for every order and no length penalty, 10; a caption sharing nothing, 0.
    """
    refs = {1: ["zebra", "the cat sat on the mat"]}
    scores, _ = caption_metrics(refs, {1: "the cat sat on a mat"}, ["BLEU"])
    assert scores["BLEU-4"] == pytest.approx(HAND_BLEU4, rel=1e-6)
    refs = {1: ["the cat sat on the mat"], 2: ["a dog runs in a park"]}
    scores, _ = caption_metrics(refs, {1: "the cat sat on the mat", 2: "zebra"}, ["CIDEr"])
    assert scores["CIDEr"] == pytest.approx(100 * (10 + 0) / 2, rel=1e-6)


def test_caption_metrics_without_java_fold_case_and_punctuation(monkeypatch, caplog):
    """Without Java the fallback tokenizer, as coco-caption's PTB tokenizer, lower-cases and drops
    punctuation: "The Cat sat on the mat." scores as "the cat sat on the mat" (hand value as in
    test_caption_metrics_by_hand)."""
    monkeypatch.setattr("shutil.which", lambda name: None)
    refs = {1: ["Zebra!", "The Cat sat on the mat."]}
    with caplog.at_level(logging.WARNING):
        scores, skipped = caption_metrics(refs, {1: "the cat, sat on a MAT"}, ["BLEU", "METEOR"])
    assert "simple Python fallback" in caplog.text
    assert skipped == {"METEOR": "no Java runtime"}
    assert scores["BLEU-4"] == pytest.approx(HAND_BLEU4, rel=1e-6)


@pytest.mark.parametrize(
    "captions",
    [
        # every reference of the image, not the first only: against "zebra" alone BLEU-4 is ~0
        ["zebra", "the cat sat on the mat"],
        # one string is one caption, not a list of its characters
        "the cat sat on the mat",
    ],
)
def test_evaluator_scores_against_the_record_references(captions):
    """The evaluator scores each caption against its record's references (hand value as in
    test_caption_metrics_by_hand)."""
    ev = CaptionEvaluator("toy_captions", None, ["BLEU"], distributed=False)
    ev.reset()
    ev.process([{"image_id": 7, "captions": captions}], [{"caption": "the cat sat on a mat"}])
    res = ev.evaluate()["caption"]
    assert res["BLEU-4"] == pytest.approx(HAND_BLEU4, rel=1e-6)


def test_evaluator_writes_caption_json_and_names_images_without_references(tmp_path, caplog):
    ev = CaptionEvaluator("toy_captions", str(tmp_path), ["BLEU", "CIDEr"], distributed=False)
    ev.reset()
    ev.process(
        [{"image_id": 7, "captions": ["a red circle"]}, {"image_id": 8, "captions": ["a cat"]}],
        [{"caption": "a red circle"}, {"caption": "a dog"}],
    )
    with caplog.at_level(logging.INFO):
        res = ev.evaluate()["caption"]
    assert set(res) == {"BLEU-4", "CIDEr"} and np.isfinite(list(res.values())).all()
    # the log names BLEU-4, which detectron2's copypaste lines leave out
    assert f"toy_captions: BLEU-4 {res['BLEU-4']:.2f}, CIDEr {res['CIDEr']:.2f}" in caplog.text
    written = json.loads((tmp_path / "caption.json").read_text())
    assert written == [
        {"image_id": 7, "caption": "a red circle"},
        {"image_id": 8, "caption": "a dog"},
    ]
    with pytest.raises(BadRecordError, match=r"image 9 \(x.png\) has no reference caption"):
        ev.process([{"image_id": 9, "file_name": "x.png", "captions": ["  "]}], [{"caption": "a"}])


def test_evaluator_keeps_each_image_id_in_caption_json(tmp_path):
    """Integer ids (numpy ones too) are written as integers, others as they are: "007" and 7 stay
    two images, a float id is not truncated."""
    ev = CaptionEvaluator("toy_captions", str(tmp_path), ["BLEU"], distributed=False)
    ev.reset()
    ids = [np.int64(7), "007", "a/b.jpg", 1.5]
    ev.process([{"image_id": i, "captions": ["a cat"]} for i in ids], [{"caption": "a cat"}] * 4)
    ev.evaluate()
    written = json.loads((tmp_path / "caption.json").read_text())
    assert [c["image_id"] for c in written] == [7, "007", "a/b.jpg", "1.5"]


def test_category_agreement_by_hand():
    from captioning.shapes_demo import category_agreement, named_categories

    assert named_categories("a large red circle left of the blue squares and the triangles") == {
        "red circle",
        "blue square",
    }
    generated = {1: "a red circle and a blue square", 2: "a picture of a small green triangle"}
    refs = {
        1: ["a picture of a large red circle and a small green triangle", "the red circle"],
        2: ["a picture of a green triangle"],
    }
    scores = category_agreement(generated, refs)
    # own image: caption 1 names {red circle, blue square}, image 1 holds {red circle, green
    # triangle}: 1 hit; caption 2 names and image 2 holds {green triangle}: 1 hit
    assert scores["category_precision"] == pytest.approx(100 * 2 / 3)  # 2 hits / 3 named
    assert scores["category_recall"] == pytest.approx(100 * 2 / 3)  # 2 hits / 3 held
    # chance: caption 1 against image 2 (0 hits), caption 2 against image 1 (green triangle)
    assert scores["category_precision_chance"] == pytest.approx(100 * 1 / 3)
    assert scores["category_recall_chance"] == pytest.approx(100 * 1 / 3)  # held: 1 + 2


def test_category_precision_and_recall_are_not_swapped():
    """Precision divides the hits by the categories the captions name, recall by those the images
    hold; counts chosen so that the two differ (by hand)."""
    from captioning.shapes_demo import category_agreement

    generated = {1: "a red circle and a blue square and a green triangle", 2: "a red circle"}
    refs = {1: ["a red circle"], 2: ["a red circle and a blue square"]}
    scores = category_agreement(generated, refs)
    # own: caption 1 names 3, image 1 holds 1, 1 hit; caption 2 names 1, image 2 holds 2, 1 hit
    assert scores["category_precision"] == pytest.approx(100 * 2 / 4)
    assert scores["category_recall"] == pytest.approx(100 * 2 / 3)
    # chance: caption 1 against image 2 (2 hits of 3 named, 2 held), caption 2 against image 1
    # (1 hit of 1 named, 1 held)
    assert scores["category_precision_chance"] == pytest.approx(100 * 3 / 4)
    assert scores["category_recall_chance"] == pytest.approx(100 * 3 / 3)


def test_references_are_deduplicated_per_image_in_order():
    """Coarse spec: captions are de-duplicated per image (a repeated reference would weigh twice in
    CIDEr-D), first occurrence kept, whether the records hold one caption or a list."""
    records = [
        {"dataset_name": "d", "image_id": 1, "caption": "a red circle"},
        {"dataset_name": "d", "image_id": 1, "caption": "a blue square"},
        {"dataset_name": "d", "image_id": 1, "caption": "a red circle"},
        {"dataset_name": "d", "image_id": 2, "captions": ["x", "y", "x", "y", "z"]},
        {"dataset_name": "e", "image_id": 1, "caption": "a red circle"},  # another dataset
    ]
    assert references_by_image(records) == {
        ("d", 1): ["a red circle", "a blue square"],
        ("d", 2): ["x", "y", "z"],
        ("e", 1): ["a red circle"],
    }


def test_most_frequent_caption_baseline_emits_the_commonest_training_caption():
    from captioning.shapes_demo import most_frequent_caption_baseline
    from detectron2.data import DatasetCatalog

    train = [{"caption": c} for c in ["a red circle", "a blue square", "a blue square"]]
    test = [
        {"image_id": 1, "captions": ["a blue square"]},
        {"image_id": 2, "captions": ["a red circle"]},
    ]
    for name, records in (("_mfc_train", train), ("_mfc_test", test)):
        DatasetCatalog.register(name, lambda r=records: r)
    try:
        caption, scores = most_frequent_caption_baseline("_mfc_train", "_mfc_test", ["BLEU"])
        refs = {r["image_id"]: r["captions"] for r in test}
        expected, _ = caption_metrics(refs, {1: "a blue square", 2: "a blue square"}, ["BLEU"])
    finally:
        for name in ("_mfc_train", "_mfc_test"):
            DatasetCatalog.remove(name)
    assert caption == "a blue square"  # twice in training, "a red circle" once
    assert scores == expected
