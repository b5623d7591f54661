"""The six benchmarks' scorers against numbers computed by hand from their official rules."""

from __future__ import annotations

import pytest

from tasks.quality.answers import CONTRACTIONS, mmbench_letter, pope_yes_no, sqa_letter, vqa_normalise
from tasks.quality.scoring import AnswersError, EvalItem, average, score, textvqa_accuracy


def item(qid: str, truth: object, **kw: object) -> EvalItem:
    return EvalItem(str(qid), qid, "q", None, truth, **kw)  # type: ignore[arg-type]


def test_gqa_is_exact_match_after_lowercasing_and_a_trailing_period() -> None:
    items = [item("1", "yes"), item("2", "red"), item("3", "left"), item("4", "2")]
    answers = {"1": "Yes.", "2": "red ", "3": "", "4": "two"}  # GQA has no number-word rule
    got = score("gqa", items, answers, "t")
    assert got.headline == 50.0 and got.correct == {"1": True, "2": True, "3": False, "4": False}


def test_textvqa_answer_processor_and_leave_one_out_accuracy() -> None:
    brands = ["coca cola"] * 4 + ["coke"] * 3 + ["cola"] * 3
    assert vqa_normalise("Coca-Cola") == "coca cola"  # a dash between letters becomes a space
    assert textvqa_accuracy("Coca-Cola", brands) == 1.0  # 4 agree: 3 or 4 of 9 in every subset
    assert textvqa_accuracy("coke", brands) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)  # 0.9
    assert textvqa_accuracy("cola.", brands) == pytest.approx(0.9)  # the period is stripped
    assert textvqa_accuracy("two", ["2", "2", "two"] + ["3"] * 7) == pytest.approx(0.9)  # number word
    assert textvqa_accuracy("the sprite", ["sprite"] + ["fanta"] * 9) == pytest.approx(9 * (1 / 3) / 10)
    assert textvqa_accuracy("dont", ["don't"] * 10) == 1.0 and CONTRACTIONS["dont"] == "don't"
    assert textvqa_accuracy("", ["stop"] * 10) == 0.0
    assert vqa_normalise("3.5") == "3.5" and vqa_normalise("1,000") == "1000"
    items = [item("a", brands), item("b", ["sprite"] + ["fanta"] * 9)]
    got = score("textvqa", items, {"a": "coke", "b": "sprite"}, "t")
    assert got.headline == pytest.approx(100 * (0.9 + 0.3) / 2)


def test_pope_reads_the_first_sentence_and_averages_f1_over_splits() -> None:
    assert pope_yes_no("Yes, there is a dog. No cat.") == "yes"
    assert pope_yes_no("There is not a dog.") == "no" and pope_yes_no("") == "yes"
    assert pope_yes_no("I don't think so") == "yes"  # only the words No, no and not read as no
    rows = [("r1", "yes", "Yes, there is."), ("r2", "yes", "No."), ("r3", "no", "There is not a dog."),
            ("r4", "no", "no"), ("p1", "yes", "Yes"), ("p2", "no", "Yes"), ("a1", "yes", "no"),
            ("a2", "no", "no")]  # fmt: skip
    split = {"r": "random", "p": "popular", "a": "adversarial"}
    items = [item(q, t, group={"split": split[q[0]]}) for q, t, _ in rows]
    got = score("pope", items, {q: a for q, _, a in rows}, "t")
    m = got.metrics
    assert (m["random/accuracy"], m["random/precision"], m["random/recall"]) == (0.75, 1.0, 0.5)
    assert m["random/f1"] == pytest.approx(2 / 3) and m["random/yes_ratio"] == 0.25
    assert m["popular/f1"] == pytest.approx(2 / 3) and m["popular/yes_ratio"] == 1.0
    assert m["adversarial/f1"] == 0.0 and m["adversarial/precision"] == 0.0  # no yes answered
    assert got.headline == pytest.approx(100 * (2 / 3 + 2 / 3 + 0) / 3)


def test_mme_sums_accuracy_and_accuracy_plus_per_subtask() -> None:
    rows = [("1", "existence", "a", "Yes", "Yes"), ("2", "existence", "a", "No", "No, there is not."),
            ("3", "existence", "b", "Yes", "yes."), ("4", "existence", "b", "No", "Yes"),
            ("5", "OCR", "c", "Yes", "The answer is yes"), ("6", "OCR", "c", "No", "no"),
            ("7", "code_reasoning", "d", "Yes", "yes"), ("8", "code_reasoning", "d", "No", "no")]  # fmt: skip
    items = [item(q, t, group={"subtask": s, "image": i}) for q, s, i, t, _ in rows]
    got = score("mme", items, {q: a for q, *_, a in rows}, "t")
    assert got.metrics["existence/acc"] == 75.0 and got.metrics["existence/acc_plus"] == 50.0
    assert got.metrics["OCR/score"] == 50.0  # "The answer is yes" starts with neither: wrong
    assert got.headline == 175.0 and got.metrics["cognition"] == 200.0
    assert got.counts["unreadable"] == 1 and got.counts["images"] == 4


def test_scienceqa_parses_the_letter_and_reports_the_image_questions() -> None:
    opts = {"A": "cat", "B": "dog", "C": "bird"}
    assert sqa_letter("B. The dog", "ABC") == "B" and sqa_letter("The answer is C.", "ABC") == "C"
    assert sqa_letter("D", "ABC") is None and sqa_letter("b", "ABC") is None
    rows = [("1", "A", "A", "1"), ("2", "B", "B. dog", "1"), ("3", "C", "The answer is C.", "1"),
            ("4", "A", "D", "1"), ("5", "B", "b", "1"), ("6", "A", "A", "0")]  # fmt: skip
    items = [item(q, t, options=opts, group={"has_image": h}) for q, t, _, h in rows]
    got = score("sqa", items, {q: a for q, _, a, _ in rows}, "t")
    assert got.headline == 60.0 and got.metrics["accuracy"] == pytest.approx(400 / 6)
    assert got.counts == {"questions": 6, "image_questions": 5, "unreadable": 2}


def test_mmbench_counts_a_question_only_when_every_rotation_is_right() -> None:
    animals = [("0", {"A": "cat", "B": "dog", "C": "bird"}, "A", "A"),
               ("1000000", {"A": "dog", "B": "bird", "C": "cat"}, "C", "C. cat"),
               ("2000000", {"A": "bird", "B": "cat", "C": "dog"}, "B", "cat")]  # fmt: skip
    colours = [("1", {"A": "red", "B": "blue"}, "B", "B"), ("1000001", {"A": "blue", "B": "red"}, "A", "B")]
    unsure = [("2", {"A": "yes", "B": "no"}, "A", "I am not sure")]
    rows = [(*r, "animals") for r in animals] + [(*r, "colours") for r in colours + unsure]
    items = [item(q, t, options=o, group={"base": str(int(q) % 1_000_000), "category": c})
             for q, o, t, _, c in rows]  # fmt: skip
    got = score("mmbench", items, {q: a for q, _, _, a, _ in rows}, "t")
    assert got.headline == pytest.approx(100 / 3)
    assert got.metrics["single_pass_accuracy"] == pytest.approx(200 / 3)
    assert got.metrics["category/animals"] == 100.0 and got.metrics["category/colours"] == 0.0
    assert got.counts == {"questions": 3, "rows": 6, "unmatched": 1}
    assert mmbench_letter("(B) dog", {"A": "cat", "B": "dog"}) == "B"
    assert mmbench_letter("", {"A": "cat"}) is None and mmbench_letter("E", {"A": "x", "B": "y"}) is None


def test_answers_out_of_step_with_the_questions_are_refused() -> None:
    items = [item("1", "yes"), item("2", "no")]
    with pytest.raises(
        AnswersError, match=r"preds.jsonl: 1 of 2 questions have no answer \(first: \['2'\]\)"
    ):
        score("gqa", items, {"1": "yes"}, "preds.jsonl")
    extra = r"1 answers are for questions not in the set \(first: \['9'\]\)"
    with pytest.raises(AnswersError, match=extra):
        score("gqa", items, {"1": "yes", "2": "no", "9": "x"}, "preds.jsonl")
    with pytest.raises(KeyError, match="unknown benchmark 'vqav2'"):
        score("vqav2", items, {}, "x")


def test_the_papers_average_divides_mme_by_20() -> None:
    row = {"gqa": 56.1, "sqa": 57.3, "textvqa": 41.5, "pope": 84.5, "mme": 1196.2, "mmbench": 53.2}
    assert round(average(row), 1) == 58.7  # MobileVLM 1.7B in the authors' table
    assert average({"gqa": 50.0}) is None
