"""VQA answers: the official normalisation, soft scores, the answer vocabulary and the official accuracy.

Normalisation (the VQA evaluation tools' ``processPunctuation`` + ``processDigitArticle``):

* punctuation ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted when it touches a space (or the
  text has a digit-comma-digit group), otherwise replaced by a space; a period not followed by a digit
  is deleted ("3.x" -> "3x", "x.5" kept: the official pattern's look-behind is a typo), at most 32;
* lower case; number words ``none``/``zero``..``ten`` become digits; the articles ``a``, ``an``, ``the``
  are dropped; contractions written without one of their apostrophes (``dont``, ``isnt``,
  ``shouldnt've``...) get it back (``shouldntve``, two missing, stays as it is).

The official table lists contractions one by one; here the table is derived from the contracted forms
below: every form with exactly one of its apostrophes missing maps to the full form, except that
``lets`` and ``shes`` (English words) stay as they are, and ``somebody'd`` is reversed: it becomes
``somebodyd`` (the official table's own slip, kept because the official accuracy applies it). That
gives exactly the official table's entries (those that change a word).

Accuracy of one predicted answer against the 10 human answers (official): answers are stripped; when the
humans disagree, both sides are normalised, else neither (not even lower-cased); exact matches; then for each of the 10 leave-one-out subsets of 9 humans
``min(#matches / 3, 1)``, averaged.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence

__all__ = [
    "normalize_answer",
    "process_punctuation",
    "process_digit_article",
    "vqa_accuracy",
    "answer_score",
    "answer_scores",
    "build_answer_vocab",
    "vocab_from_labels",
]

logger = logging.getLogger(__name__)

_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`"]
_PUNCT += [",", "?", "!"]
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_CONTRACTED = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't
he'd he'd've he's how'd how'll how's I'd've I'm I've isn't it'd it'd've it'll let's ma'am mightn't
mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've she's
should've shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd
someone'd've someone'll someone's something'd something'd've something'll that's there'd there'd've
there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll
what're what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll
why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll
you're you've
""".split()


_LEFT_ALONE = {"let's", "she's", "somebody'd"}  # "lets", "shes": words; "somebody'd": below


def _contractions() -> dict[str, str]:
    table = {}
    for full in _CONTRACTED:
        if full in _LEFT_ALONE:
            continue
        for cut in (i for i, ch in enumerate(full) if ch == "'"):
            table[full[:cut] + full[cut + 1 :]] = full
    table["somebody'd"] = "somebodyd"  # as the official table (its slip)
    return table


_CONTRACTIONS = _contractions()


def process_punctuation(text: str) -> str:
    """The official punctuation rule (see the module docstring)."""
    out = text
    comma_group = _COMMA_STRIP.search(text) is not None
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or comma_group:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # at most 32 periods: the official tool passes re.UNICODE (32) where sub() takes its count
    return _PERIOD_STRIP.sub("", out, count=32)


def process_digit_article(text: str) -> str:
    """Lower case, number words to digits, no articles, contractions restored."""
    words = []
    for word in text.lower().split():
        word = _NUMBERS.get(word, word)
        if word not in _ARTICLES:
            words.append(word)
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer: str) -> str:
    """Whitespace-cleaned, punctuation-, number-, article- and contraction-normalised answer."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(answer))


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """The official VQA accuracy of one prediction (0..1) against the human answers (usually 10).

    Raises:
        ValueError: no human answers.
    """
    if not human_answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    pred = prediction.replace("\n", " ").replace("\t", " ").strip()
    gts = [a.replace("\n", " ").replace("\t", " ").strip() for a in human_answers]
    if len(set(gts)) > 1:
        gts = [normalize_answer(a) for a in gts]
        pred = normalize_answer(pred)
    # exact strings, as the official tool: when the humans agree, neither side is normalised, so
    # not lower-cased either ("yes" scores 0 against ten "Yes")
    matches = [g == pred for g in gts]
    accs = []
    for i in range(len(gts)):
        others = sum(matches) - matches[i]
        accs.append(min(1.0, others / 3.0))
    return sum(accs) / len(accs)


def answer_score(count: int) -> float:
    """Soft target of an answer given by ``count`` annotators: 0, 0.3, 0.6, 0.9, then 1.0."""
    return (0.0, 0.3, 0.6, 0.9)[count] if count < 4 else 1.0


def answer_scores(human_answers: Iterable[str]) -> dict[str, float]:
    """{answer: soft score} of one question's human answers, counted as the annotators wrote them.

    As the original: its soft targets count the raw answer strings and keep those that are
    vocabulary entries (which are normalised), so "Two" and "two" count for no entry when the
    entry is "2".
    """
    counts = Counter(human_answers)
    return {a: answer_score(n) for a, n in sorted(counts.items())}


def build_answer_vocab(records: Iterable[dict], min_count: int) -> list[str]:
    """Answers (normalised ``multiple_choice_answer``) occurring at least ``min_count`` times.

    In the order of their first occurrence in ``records``: the original's label order (its counter
    over the train2014 then val2014 annotations, in file order, with nothing filtered out), which
    the classifier rows of a converted ``fiber_vqa.ckpt`` follow. VQAv2 train2014 + val2014 with
    ``min_count`` 9 gives its 3129 answers.
    """
    counts = Counter(normalize_answer(r["multiple_choice_answer"]) for r in records)
    return [a for a, n in counts.items() if n >= min_count]


def vocab_from_labels(records: Iterable[dict]) -> list[str]:
    """The vocabulary that the original's Arrow files were written with, read back from the
    records' ``answer_labels``: (class index, answer) pairs of each question's labelled answers.

    A class index that no record names (no annotator wrote its answer exactly) becomes the
    placeholder ``"<label i>"``, so that every other class keeps its index; a warning counts them.

    Raises:
        ValueError: a class index given two different answers (one line).
    """
    table: dict[int, str] = {}
    for r in records:
        for label, answer in r["answer_labels"]:
            if table.setdefault(int(label), answer) != answer:
                raise ValueError(
                    f"question {r.get('question_id')}: label {label} is {answer!r} here and "
                    f"{table[int(label)]!r} elsewhere"
                )
    size = max(table, default=-1) + 1
    missing = [i for i in range(size) if i not in table]
    if missing:
        logger.warning(
            "%d of %d answer labels are named by no record (first: %s): placeholders '<label i>'; "
            "give the original vocabulary as VQA.ANSWER_VOCAB to name them",
            len(missing),
            size,
            missing[:5],
        )
    return [table.get(i, f"<label {i}>") for i in range(size)]
