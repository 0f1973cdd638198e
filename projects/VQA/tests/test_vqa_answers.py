"""The official VQA answer normalisation and accuracy on worked examples, soft scores, the vocabulary,
the soft-target BCE x V loss against a hand computation and the unanswerable-question filter."""

import math

import pytest
import torch
from arrow_tables import arrow_file
from vqa import (
    VQAEvaluator,
    answer_score,
    answer_scores,
    build_answer_vocab,
    drop_unanswerable,
    normalize_answer,
    soft_target,
    vqa_accuracy,
    vqa_loss,
)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two", "2"),  # number words, lower case
        ("none", "0"),
        ("the red car", "red car"),  # articles dropped
        ("an apple or one pear", "apple or 1 pear"),
        ("a dog.", "dog"),  # sentence period dropped
        ("3.5", "3.5"),  # a period inside a number stays
        ("2.", "2"),  # after a digit too: the official "(?!<=\d)" is no lookbehind
        ("." * 40 + "x", "." * 8 + "x"),  # at most 32 periods go (the official tool's count slip)
        ("dont know", "don't know"),  # contractions get their apostrophe back
        ("isnt", "isn't"),
        ("wont", "won't"),
        ("shouldnt've", "shouldn't've"),  # one of two missing
        ("shouldn'tve", "shouldn't've"),
        ("shouldntve", "shouldntve"),  # both missing: not in the official table
        ("lets go", "lets go"),  # words the official table leaves alone
        ("shes", "shes"),
        ("somebody'd", "somebodyd"),  # the official table's slip, reproduced
        ("somebodyd", "somebodyd"),
        ("black-and-white", "black and white"),  # punctuation inside a word -> space
        ("yes !", "yes"),  # punctuation next to a space -> deleted
        # "-" has a space before it, so every "-" is deleted, also the one inside "t-shirt"
        ("t-shirt -", "tshirt"),
        # a tab counts as a space (the official tool replaces tabs and newlines first)
        ("t-shirt\t-", "tshirt"),
        # whether a mark touches a space is read off the answer as given, not after the marks
        # before it in the list became spaces: "/" -> " " makes " -", yet every "-" -> " "
        ("black/-white t-shirt", "black white t shirt"),
        ("1,000", "1000"),  # digit-comma-digit: commas deleted
        ("  ten\tdogs ", "10 dogs"),
    ],
)
def test_normalisation_rules(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize(
    "word, digit",
    [("none", "0"), ("zero", "0"), ("one", "1"), ("two", "2"), ("three", "3"), ("four", "4"),
     ("five", "5"), ("six", "6"), ("seven", "7"), ("eight", "8"), ("nine", "9"), ("ten", "10")],
)  # fmt: skip
def test_every_official_number_word_becomes_its_digit(word, digit):
    """The official table maps none/zero..ten to digits, alone and inside an answer."""
    assert normalize_answer(word) == digit
    assert normalize_answer(f"{word.capitalize()} cats") == f"{digit} cats"


# The official VQA evaluation tool's contractions table (vqaEval.py, ``self.contractions``), as
# "written form: restored form" pairs.
_OFFICIAL_CONTRACTIONS = """
aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've
couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've
hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's
howd:how'd howll:how'll hows:how's Id've:I'd've I'dve:I'd've Im:I'm Ive:I've isnt:isn't itd:it'd
itd've:it'd've it'dve:it'd've itll:it'll let's:let's maam:ma'am mightnt:mightn't
mightnt've:mightn't've mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've
neednt:needn't notve:not've oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at
'ow'sat:'ow's'at shant:shan't shed've:she'd've she'dve:she'd've she's:she's shouldve:should've
shouldnt:shouldn't shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd
somebodyd've:somebody'd've somebody'dve:somebody'd've somebodyll:somebody'll somebodys:somebody's
someoned:someone'd someoned've:someone'd've someone'dve:someone'd've someonell:someone'll
someones:someone's somethingd:something'd somethingd've:something'd've
something'dve:something'd've somethingll:something'll thats:that's thered:there'd
thered've:there'd've there'dve:there'd've therere:there're theres:there's theyd:they'd
theyd've:they'd've they'dve:they'd've theyll:they'll theyre:they're theyve:they've twas:'twas
wasnt:wasn't wed've:we'd've we'dve:we'd've weve:we've werent:weren't whatll:what'll
whatre:what're whats:what's whatve:what've whens:when's whered:where'd wheres:where's
whereve:where've whod:who'd whod've:who'd've who'dve:who'd've wholl:who'll whos:who's whove:who've
whyll:why'll whyre:why're whys:why's wont:won't wouldve:would've wouldnt:wouldn't
wouldnt've:wouldn't've wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll y'allll:y'all'll
yall'd've:y'all'd've y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd youd've:you'd've
you'dve:you'd've youll:you'll youre:you're youve:you've
"""


@pytest.mark.parametrize(
    "written, restored", [pair.split(":") for pair in _OFFICIAL_CONTRACTIONS.split()]
)
def test_every_official_contraction_is_restored(written, restored):
    """Each entry of the official contractions table applies, alone and inside an answer; the
    official tool looks words up after lower-casing them, so its capitalised keys ("Im",
    "Id've") never apply."""
    from vqa.answers import process_digit_article

    expected = restored if written == written.lower() else written.lower()
    assert process_digit_article(written) == expected
    assert process_digit_article(f"no {written} here") == f"no {expected} here"


def test_accuracy_counts_humans_over_leave_one_out_subsets():
    # 3 of 10 humans said "2": 7 subsets keep all 3 (acc 1), 3 subsets keep 2 (acc 2/3)
    humans = ["2"] * 3 + ["3"] * 7
    assert vqa_accuracy("2", humans) == pytest.approx((7 * 1 + 3 * (2 / 3)) / 10)
    # 1 human: 9 subsets hold it (1/3), one does not (0)
    assert vqa_accuracy("3", ["3"] + ["4"] * 9) == pytest.approx(9 * (1 / 3) / 10)
    # 4+ humans: every subset has >= 3 matches
    assert vqa_accuracy("yes", ["yes"] * 4 + ["no"] * 6) == pytest.approx(1.0)
    assert vqa_accuracy("maybe", ["yes"] * 10) == 0.0


def test_accuracy_normalises_only_when_humans_disagree():
    # humans disagree -> both sides normalised: "two" matches "2", "Dog." matches "dog"
    assert vqa_accuracy("two", ["2"] * 5 + ["3"] * 5) == pytest.approx(1.0)
    assert vqa_accuracy("Dog.", ["dog"] * 4 + ["cat"] * 6) == pytest.approx(1.0)
    # humans agree -> no normalisation (official), not even case; only surrounding whitespace
    assert vqa_accuracy("two", ["2"] * 10) == 0.0
    assert vqa_accuracy(" yes ", ["yes\n"] * 10) == 1.0
    assert vqa_accuracy("yes", ["Yes"] * 10) == 0.0
    assert vqa_accuracy("Yes", ["Yes"] * 10) == 1.0
    # humans disagree -> case folds with the rest of the normalisation
    assert vqa_accuracy("yes", ["Yes"] * 5 + ["yes"] * 2 + ["no"] * 3) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])


def test_soft_scores_and_vocabulary():
    assert [answer_score(n) for n in range(6)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0]
    # the annotators' strings are counted as written (the original's soft targets): "Two" and
    # "two" do not count for the entry "2"
    scores = answer_scores(["Two", "2", "two", "3", "blue", "blue", "blue", "blue", "blue", "x"])
    assert scores == {"2": 0.3, "3": 0.3, "Two": 0.3, "blue": 1.0, "two": 0.3, "x": 0.3}
    # normalised multiple-choice answers in the order of their first occurrence (the original's
    # label order), not by count: "no" comes before "yes", "2" ("two") before "b"
    answers = ["No", "yes", "yes", "two", "yes", "no", "2", "b", ""]
    records = [{"multiple_choice_answer": a} for a in answers]
    assert build_answer_vocab(records, 2) == ["no", "yes", "2"]
    assert build_answer_vocab(records, 1) == ["no", "yes", "2", "b", ""]  # "" counts too


def test_soft_target_bce_times_v_against_hand_computation():
    index = {"yes": 0, "no": 1, "2": 2}
    target = soft_target({"yes": 0.3, "2": 1.0, "unknown": 0.6}, index)
    assert target.tolist() == pytest.approx([0.3, 0.0, 1.0])
    logits = torch.tensor([[0.5, -1.0, 2.0]])
    hand = 0.0
    for x, t in zip([0.5, -1.0, 2.0], [0.3, 0.0, 1.0]):
        p = 1 / (1 + math.exp(-x))
        hand += -(t * math.log(p) + (1 - t) * math.log(1 - p))
    # mean over B x V, times V = sum over answers, mean over the batch
    assert vqa_loss(logits, target[None]).item() == pytest.approx(hand, rel=1e-6)
    two = torch.cat([logits, torch.zeros(1, 3)])
    t2 = torch.cat([target[None], torch.zeros(1, 3)])
    assert vqa_loss(two, t2).item() == pytest.approx((hand + 3 * math.log(2)) / 2, rel=1e-6)


def test_unanswerable_training_questions_are_counted_and_dropped(caplog):
    records = [
        {"question_id": 1, "answer_scores": {"yes": 1.0}},
        {"question_id": 2, "answer_scores": {"purple": 0.3}},
        {"question_id": 3, "answer_scores": {}},
    ]
    with caplog.at_level("WARNING"):
        kept = drop_unanswerable(records, ["yes", "no"])
    assert [r["question_id"] for r in kept] == [1]
    assert "dropped 2 of 3 training questions" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        kept = drop_unanswerable(records[:2], ["yes", "no"])
    assert [r["question_id"] for r in kept] == [1]
    assert "dropped 1 of 2 training questions" in caplog.text  # a single drop is counted too


def test_evaluator_accuracy_per_type_and_submission_file(tmp_path):
    import json

    ev = VQAEvaluator("toy", ["yes", "no", "2"], str(tmp_path))
    ev.reset()
    inputs = [
        {"question_id": 7, "answers": ["yes"] * 10, "answer_type": "yes/no", "question_type": "is"},
        {"question_id": 8, "answers": ["2"] * 3 + ["3"] * 7, "answer_type": "number",
         "question_type": "how many"},  # fmt: skip
        {"question_id": 9, "answer_scores": {"no": 0.6}, "question_type": "is"},  # Arrow-style
        {"question_id": 11, "answers": ["no"] * 10, "question_type": "how many"},
        {"question_id": 10},  # test question: submission only
    ]
    outputs = [{"answer_index": i} for i in (0, 2, 1, 0, 1)]
    ev.process(inputs, outputs)
    res = ev.evaluate()["vqa"]
    acc_number = (7 + 3 * 2 / 3) / 10
    assert res["accuracy"] == pytest.approx(100 * (1 + acc_number + 0.6 + 0) / 4)
    assert res["accuracy_number"] == pytest.approx(100 * acc_number)
    assert res["accuracy_yes/no"] == pytest.approx(100.0)
    # per question type, over every scored question of that type, whatever its answer type
    assert res["accuracy_qtype/is"] == pytest.approx(100 * (1 + 0.6) / 2)
    assert res["accuracy_qtype/how many"] == pytest.approx(100 * (acc_number + 0) / 2)
    qtypes = {k for k in res if k.startswith("accuracy_qtype/")}
    assert qtypes == {"accuracy_qtype/is", "accuracy_qtype/how many"}
    assert res["num_questions"] == 5
    submit = json.loads((tmp_path / "vqa_submit.json").read_text())
    assert submit == [
        {"question_id": 7, "answer": "yes"},
        {"question_id": 8, "answer": "2"},
        {"question_id": 9, "answer": "no"},
        {"question_id": 11, "answer": "yes"},
        {"question_id": 10, "answer": "no"},
    ]


def test_evaluator_scores_human_answers_first_and_unlisted_answers_zero():
    """Human answers, when a record has them, are scored with the official accuracy even if soft
    scores are present too; a soft-score-only record scores 0 for an answer it does not list."""
    ev = VQAEvaluator("toy", ["yes", "no"], None)
    ev.reset()
    inputs = [
        # deliberately inconsistent soft score: the 10 agreeing humans must decide (accuracy 1)
        {"question_id": 1, "answers": ["yes"] * 10, "answer_scores": {"yes": 0.3}},
        {"question_id": 2, "answer_scores": {"no": 0.6}},  # predicted "yes": not listed -> 0
    ]
    ev.process(inputs, [{"answer_index": 0}, {"answer_index": 0}])
    assert ev.evaluate()["vqa"]["accuracy"] == pytest.approx(100 * (1.0 + 0.0) / 2)


def test_official_json_release_records(tmp_path):
    import json

    from vqa import load_vqa_json

    q = {"questions": [{"image_id": 42, "question_id": 420, "question": "How many dogs?"}]}
    answers = ["2"] * 3 + ["two"] * 2 + ["3"] * 5
    a = {"annotations": [{"question_id": 420, "multiple_choice_answer": "2", "answer_type": "number",
                          "question_type": "how many", "answers": [{"answer": x} for x in answers]}]}  # fmt: skip
    (tmp_path / "q.json").write_text(json.dumps(q))
    (tmp_path / "a.json").write_text(json.dumps(a))
    (r,) = load_vqa_json(str(tmp_path / "q.json"), str(tmp_path / "a.json"), "/coco", "val2014")
    assert r["file_name"] == "/coco/COCO_val2014_000000000042.jpg"
    assert r["answer_scores"] == {"2": 0.9, "3": 1.0, "two": 0.6} and r["answers"] == answers
    assert r["multiple_choice_answer"] == "2"  # the annotation's own field, not a human answer
    assert r["answer_type"] == "number" and r["question_type"] == "how many"
    (t,) = load_vqa_json(str(tmp_path / "q.json"), None, "/coco", "test2015")
    assert "answers" not in t and t["question_id"] == 420
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_vqa_json(str(tmp_path / "nope.json"), None, "/coco", "val2014")


@pytest.mark.parametrize(
    "question, answers, message",
    [
        ({"image_id": "42", "question": "q"}, None, "q.json: question_id 420: .*image_id must be"),
        ({"image_id": 42, "question": None}, None, "q.json: question_id 420: .*question must be"),
        ({"image_id": 42}, None, "q.json: question_id 420: bad record \\(no field 'question'"),
        ({"image_id": 42, "question": "q"}, "yes", "a.json: question_id 420: bad record"),
        ({"image_id": 42, "question": "q"}, {"multiple_choice_answer": 2},
         "a.json: question_id 420: .*multiple_choice_answer must be a string, got 2"),
        ({"image_id": 42, "question": "q"}, {"image_id": 43},
         "a.json: question_id 420: .*image_id 43 differs from its question's image_id 42"),
    ],
)  # fmt: skip
def test_malformed_json_release_record_names_file_and_question(
    question, answers, message, tmp_path
):
    """Each was a traceback (TypeError, format errors, transformers' error at the first batch, an
    AttributeError building the answer vocabulary) or a line naming neither the file nor the
    question. ``answers``: the annotation's answers, or a dict of annotation fields to set."""
    import json

    from vqa import load_vqa_json

    q = {"questions": [dict(question, question_id=420)]}
    ann = {"question_id": 420, "image_id": question.get("image_id"), "multiple_choice_answer": "yes",
           "answers": [{"answer": "yes"}]}  # fmt: skip
    if isinstance(answers, dict):
        ann.update(answers)
    elif answers is not None:
        ann["answers"] = answers
    (tmp_path / "q.json").write_text(json.dumps(q))
    (tmp_path / "a.json").write_text(json.dumps({"annotations": [ann]}))
    with pytest.raises(ValueError, match=message) as err:
        load_vqa_json(str(tmp_path / "q.json"), str(tmp_path / "a.json"), "/coco", "val2014")
    assert "\n" not in str(err.value)
    (tmp_path / "q.json").write_text(json.dumps([q]))
    with pytest.raises(ValueError, match="q.json: not a VQA questions file"):
        load_vqa_json(str(tmp_path / "q.json"), None, "/coco", "val2014")


@pytest.mark.parametrize("which", ["questions", "annotations"])
@pytest.mark.parametrize(
    "content, message",
    [
        ('{"questions": [{"image_id": 1, "question_id": 1, "quest', "is not valid json"),
        ("", "is empty"),
        ("\n \n", "is empty"),
        ("{not json}", "is not valid json"),
        (b'{"questions": "\xff"}', "is not UTF-8 text"),
        (None, "is a directory"),
    ],
)
def test_unreadable_json_file_is_one_line_naming_it(which, content, message, tmp_path):
    """A truncated, empty or invalid questions or annotations file was json's error, naming
    neither file; a folder read as "file not found"."""
    import json

    from vqa import load_vqa_json

    files = {"questions": tmp_path / "q.json", "annotations": tmp_path / "a.json"}
    files["questions"].write_text(
        json.dumps({"questions": [{"image_id": 1, "question_id": 1, "question": "q"}]})
    )
    files["annotations"].write_text(
        json.dumps({"annotations": [{"question_id": 1, "multiple_choice_answer": "yes",
                                     "answers": [{"answer": "yes"}]}]})
    )  # fmt: skip
    bad = files[which]
    if content is None:
        bad.unlink()
        bad.mkdir()
    elif isinstance(content, bytes):
        bad.write_bytes(content)
    else:
        bad.write_text(content)
    with pytest.raises((ValueError, OSError)) as err:
        load_vqa_json(str(files["questions"]), str(files["annotations"]), "/coco", "val2014")
    line = str(err.value)
    assert str(bad) in line and message in line and f"VQA {which} file" in line
    assert "\n" not in line


def _write_vqa_json(tmp_path, questions, annotations):
    """q.json / a.json of ``questions`` / ``annotations`` (an annotation: (question_id, answer))."""
    import json

    q = {"questions": [{"image_id": 1, "question_id": i, "question": "q"} for i in questions]}
    ann = [{"question_id": i, "multiple_choice_answer": m, "answers": [{"answer": m}]}
           for i, m in annotations]  # fmt: skip
    (tmp_path / "q.json").write_text(json.dumps(q))
    (tmp_path / "a.json").write_text(json.dumps({"annotations": ann}))
    return str(tmp_path / "q.json"), str(tmp_path / "a.json")


@pytest.mark.parametrize("which", ["questions", "annotations"])
def test_json_file_without_records_is_one_line(which, tmp_path):
    """It loaded as 0 records; the run then stopped at detectron2's "Dataset is empty" traceback."""
    from vqa import load_vqa_json

    q, a = _write_vqa_json(tmp_path, [] if which == "questions" else [1], [])
    with pytest.raises(ValueError) as err:
        load_vqa_json(q, a, "/coco", "val2014")
    bad = q if which == "questions" else a
    assert (
        str(err.value)
        == f"{bad}: the VQA {which} file holds no records (its {which!r} list is empty)"
    )
    if which == "questions":
        with pytest.raises(ValueError, match="holds no records"):
            load_vqa_json(q, None, "/coco", "test2015")


@pytest.mark.parametrize("with_answers", [True, False])
def test_duplicate_question_id_in_the_questions_file_is_one_line(with_answers, tmp_path):
    """The later question silently replaced the earlier (or, without answers, both were kept)."""
    from vqa import load_vqa_json

    q, a = _write_vqa_json(tmp_path, [1, 2, 1], [(1, "x"), (2, "y")])
    with pytest.raises(ValueError) as err:
        load_vqa_json(q, a if with_answers else None, "/coco", "val2014")
    assert str(err.value) == f"{q}: question_id 1 is given to more than one question"


def test_duplicate_question_id_in_the_annotations_file_is_named_as_such(tmp_path):
    """It blamed the questions file ("no question for question_id 1")."""
    from vqa import load_vqa_json

    q, a = _write_vqa_json(tmp_path, [1, 2], [(1, "x"), (2, "y"), (1, "z")])
    with pytest.raises(ValueError) as err:
        load_vqa_json(q, a, "/coco", "val2014")
    assert str(err.value) == f"{a}: question_id 1 is annotated more than once"


@pytest.mark.parametrize("which", ["questions", "annotations"])
def test_question_id_that_is_not_an_int_is_one_line_naming_the_file(which, tmp_path):
    """A list was "unhashable type: 'list'", naming no file."""
    from vqa import load_vqa_json

    questions, annotations = [[1, 2]], [([1, 2], "x")]
    if which == "annotations":
        questions = [1]
    q, a = _write_vqa_json(tmp_path, questions, annotations)
    with pytest.raises(ValueError) as err:
        load_vqa_json(q, a, "/coco", "val2014")
    bad = q if which == "questions" else a
    assert str(err.value).startswith(f"{bad}: question_id [1, 2]: ")
    assert str(err.value).endswith("question_id must be an int, got [1, 2])")


def test_json_records_follow_the_annotations_order(tmp_path):
    """The vocabulary's first-occurrence order is the annotations file's, as in the original."""
    import json

    from vqa import load_vqa_json

    q = {"questions": [{"image_id": 1, "question_id": i, "question": "q"} for i in (1, 2, 3)]}
    ann = [{"question_id": i, "multiple_choice_answer": m, "answers": [{"answer": m}]}
           for i, m in ((3, "z"), (1, "x"), (2, "y"))]  # fmt: skip
    (tmp_path / "q.json").write_text(json.dumps(q))
    (tmp_path / "a.json").write_text(json.dumps({"annotations": ann}))
    records = load_vqa_json(str(tmp_path / "q.json"), str(tmp_path / "a.json"), "/coco", "val2014")
    assert [r["question_id"] for r in records] == [3, 1, 2]
    assert build_answer_vocab(records, 1) == ["z", "x", "y"]
    (tmp_path / "a.json").write_text(json.dumps({"annotations": ann[:2]}))
    with pytest.raises(ValueError, match="a.json: no annotation for question_id 2"):
        load_vqa_json(str(tmp_path / "q.json"), str(tmp_path / "a.json"), "/coco", "val2014")


def test_vocabulary_read_back_from_arrow_labels(caplog):
    """The original's Arrow rows carry (class index, answer) pairs: the vocabulary is rebuilt in
    class order; an index no row names keeps its place as a placeholder; conflicts are errors."""
    from vqa import vocab_from_labels

    records = [
        {"question_id": 1, "answer_labels": [(2, "blue"), (0, "yes")]},
        {"question_id": 2, "answer_labels": [(0, "yes"), (3, "2")]},
    ]
    with caplog.at_level("WARNING"):
        assert vocab_from_labels(records) == ["yes", "<label 1>", "blue", "2"]
    assert "1 of 4 answer labels are named by no record" in caplog.text
    records.append({"question_id": 3, "answer_labels": [(2, "red")]})
    with pytest.raises(ValueError, match="question 3: label 2 is 'red' here and 'blue' elsewhere"):
        vocab_from_labels(records)


def test_question_type_prior_against_hand_counts():
    from vqa.shapes_demo import question_type_baseline, question_type_prior

    def q(qtype, answer):
        return {"question_type": qtype, "multiple_choice_answer": answer, "answers": [answer] * 10}

    train = [
        q("exists", "no"),
        q("exists", "no"),
        q("exists", "yes"),
        q("count", "2"),
        q("count", "2"),
    ]
    test = [q("exists", "no"), q("exists", "yes"), q("count", "2"), q("count", "3"), q("count", "2"),
            q("colour", "no")]  # fmt: skip
    # an unseen type falls back to the overall most frequent training answer ("no")
    assert question_type_prior(train, test) == pytest.approx(
        {"colour": 100.0, "count": 200 / 3, "exists": 50.0}
    )
    assert question_type_baseline(train, test) == pytest.approx(100 * (1 + 2 + 1) / 6)


def _vqa_arrow_columns(**changes) -> dict:
    """Two images of the original's vqav2 Arrow layout: 2 questions, then 1 (with answers)."""
    columns = {
        "image": [b"a", b"b"],
        "questions": [["How many?", "What colour?"], ["Is it red?"]],
        "answers": [[["2", "3"], ["red"]], [["yes"]]],
        "answer_labels": [[[7, 9], [4]], [[0]]],
        "answer_scores": [[[1.0, 0.3], [0.9]], [[1.0]]],
        "image_id": [42, 43],
        "question_id": [[420, 421], [430]],
        "split": ["val", "val"],
    }
    columns.update(changes)
    return {k: v for k, v in columns.items() if v is not None}


def test_arrow_rows_become_one_record_per_question(tmp_path, monkeypatch):
    from vqa import load_vqa_arrow

    path = arrow_file(tmp_path / "vqav2_val.arrow", _vqa_arrow_columns(), monkeypatch)
    records = load_vqa_arrow(path)
    assert [(r["question_id"], r["image_id"], r["arrow_row"]) for r in records] == [
        (420, 42, 0),
        (421, 42, 0),
        (430, 43, 1),
    ]
    assert records[0]["answer_scores"] == {"2": 1.0, "3": 0.3}
    assert records[0]["multiple_choice_answer"] == "2"
    assert records[0]["answer_labels"] == [(7, "2"), (9, "3")]
    assert records[2]["question"] == "Is it red?" and records[2]["file_name"] == f"{path}#1"
    # a test file: empty answer lists, records without answers
    empty = [[], []]
    test = _vqa_arrow_columns(answers=empty, answer_labels=empty, answer_scores=empty)
    path = arrow_file(tmp_path / "vqav2_test.arrow", test, monkeypatch)
    unanswered = load_vqa_arrow(path)
    assert [r["question_id"] for r in unanswered] == [420, 421, 430]
    assert not any("answer_scores" in r or "multiple_choice_answer" in r for r in unanswered)


def test_arrow_multiple_choice_answer_is_the_highest_scoring_label(tmp_path, monkeypatch):
    """As documented: the Arrow record's ``multiple_choice_answer`` is its best-scored answer, not
    the first one listed."""
    from vqa import load_vqa_arrow

    scores = [[[0.3, 1.0], [0.9]], [[1.0]]]  # question 420: "3" (1.0) beats "2" (0.3)
    path = arrow_file(
        tmp_path / "vqav2_val.arrow", _vqa_arrow_columns(answer_scores=scores), monkeypatch
    )
    records = load_vqa_arrow(path)
    assert [r["multiple_choice_answer"] for r in records] == ["3", "red", "yes"]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"question_id": [[420], [430]]}, "row 0: 2 question(s) but 1 in question_id"),
        ({"answers": [[["2", "3"]], [["yes"]]]}, "row 0: 2 question(s) but 1 in answers"),
        ({"answer_scores": [[[1.0, 0.3], [0.9]], [[]]]},
         "row 1: question_id 430: 1 answer(s) but 0 in answer_scores"),
        ({"answer_labels": [[[7], [4]], [[0]]]},
         "row 0: question_id 420: 2 answer(s) but 1 in answer_labels"),
    ],
)  # fmt: skip
def test_arrow_lists_of_unequal_length_are_one_line_naming_the_row(
    changes, message, tmp_path, monkeypatch
):
    """zip() cut the longer list: questions or answers were dropped without a word."""
    from vqa import load_vqa_arrow

    path = arrow_file(tmp_path / "vqav2_val.arrow", _vqa_arrow_columns(**changes), monkeypatch)
    with pytest.raises(ValueError) as err:
        load_vqa_arrow(path)
    assert str(err.value) == f"{path} {message}"


@pytest.mark.parametrize("rows", [0, 2])
def test_arrow_file_without_questions_is_one_line(rows, tmp_path, monkeypatch):
    """It loaded as 0 records; the run then stopped at detectron2's "Dataset is empty"."""
    from vqa import load_vqa_arrow

    columns = _vqa_arrow_columns(questions=[[], []], question_id=[[], []], answers=[[], []],
                                 answer_labels=[[], []], answer_scores=[[], []])  # fmt: skip
    columns = {k: v[:rows] for k, v in columns.items()}
    path = arrow_file(tmp_path / "vqav2_val.arrow", columns, monkeypatch)
    with pytest.raises(ValueError) as err:
        load_vqa_arrow(path)
    assert str(err.value) == f"{path}: the VQA arrow file holds no records ({rows} rows)"


@pytest.mark.parametrize("column", ["question_id", "image"])
def test_arrow_file_without_a_column_is_one_line_naming_it(column, tmp_path, monkeypatch):
    """It was a KeyError naming the column only (or, for the images, the mapper's at the first
    batch)."""
    from vqa import load_vqa_arrow

    columns = _vqa_arrow_columns(**{column: None})
    path = arrow_file(tmp_path / "vqav2_val.arrow", columns, monkeypatch)
    with pytest.raises(ValueError) as err:
        load_vqa_arrow(path)
    assert str(err.value) == (
        f"{path}: the VQA arrow file has no column {column} (it has {', '.join(columns)})"
    )


def test_accuracy_averages_over_as_many_subsets_as_humans():
    """The official accuracy averages the leave-one-out accuracies over the humans given, also when
    there are not 10 of them: against 2 x "yes", 2 x "no" the subsets without one "yes" hold one
    match (1/3), those without one "no" two (2/3): mean 1/2."""
    assert vqa_accuracy("yes", ["yes", "yes", "no", "no"]) == pytest.approx(0.5)
    assert vqa_accuracy("a", ["a"]) == 0.0  # the one subset is empty


def test_majority_baseline_takes_the_training_answer():
    from vqa.shapes_demo import majority_baseline

    def q(answer, answers):
        return {"multiple_choice_answer": answer, "answers": answers}

    train = [q("yes", ["yes"] * 10), q("yes", ["yes"] * 10), q("2", ["2"] * 10)]
    # the test set's own commonest answer is "2"; the baseline must still answer "yes"
    test = [q("2", ["2"] * 10), q("2", ["2"] * 10), q("yes", ["yes"] * 4 + ["no"] * 6)]
    answer, accuracy = majority_baseline(train, test)
    assert answer == "yes"
    # official accuracy: 0, 0, then 1 (every 9 of the 10 humans hold at least 3 "yes") -> 1 / 3
    assert accuracy == pytest.approx(100 / 3)
