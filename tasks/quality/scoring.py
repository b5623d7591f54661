"""The six benchmarks' metrics, each as its official scorer computes it.

A scorer takes the evaluation set's items and the model's answers (question id -> text) and returns
a ``BenchmarkScore``: the headline figure papers report (percent, MME perception out of 2000), the
detailed metrics, the counts they are over and which questions were answered right (the PyTorch
and llama.cpp answers are compared question by question with these).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tasks.quality.answers import (
    gqa_normalise,
    mmbench_letter,
    mme_yes_no,
    pope_yes_no,
    sqa_letter,
    vqa_normalise,
)

BENCHMARKS = ("gqa", "sqa", "textvqa", "pope", "mme", "mmbench")
"""The six benchmarks of the MobileVLM papers, in the papers' column order."""

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")  # fmt: skip
"""MME's perception subtasks (10 x 200 points)."""
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
"""MME's cognition subtasks (not in the papers' tables)."""
MMBENCH_ROTATION = 1_000_000
"""MMBench's circular copies of question ``i`` have indices ``i + k * 1,000,000``."""


@dataclass(frozen=True)
class EvalItem:
    """One question of an evaluation set, with what its scorer needs."""

    key: str
    """Unique within the set; answers are matched by it (the authors' ``question_id``, with the
    question's first line for MME and TextVQA, whose ids repeat per image)."""
    question_id: str | int
    """The authors' ``question_id`` as their files have it (written back in answers files)."""
    prompt: str
    """The text the model is asked (question, options, hint and the benchmark's instruction)."""
    image: str | None
    """Where the image is: a path under the set's root, ``base64:<data>``, or None for text-only."""
    truth: Any
    """The reference: an answer, a list of annotators' answers (TextVQA), an option letter, yes/no."""
    group: dict[str, str] = field(default_factory=dict)
    """Grouping keys: POPE ``split``, MME ``subtask`` and ``image``, MMBench ``base`` and
    ``category``, ScienceQA ``has_image``."""
    options: dict[str, str] = field(default_factory=dict)
    """Option letter -> text for multiple-choice benchmarks."""


@dataclass
class BenchmarkScore:
    """A benchmark's scores for one model."""

    benchmark: str
    """One of ``BENCHMARKS``."""
    headline: float
    """The figure papers report: percent, MME perception out of 2000."""
    metrics: dict[str, float]
    """Every metric the official scorer prints (per split, subtask or category where it has them)."""
    counts: dict[str, int]
    """How many questions, images, groups or unreadable answers the metrics are over."""
    correct: dict[str, bool]
    """Question id -> answered right."""


class AnswersError(ValueError):
    """Answers that do not fit the questions (missing, unknown or duplicate ids)."""


def check_answers(items: Sequence[EvalItem], answers: Mapping[str, str], where: str) -> None:
    """Refuse answers out of step with the questions: every question answered, nothing else."""
    ids = {i.key for i in items}
    missing = sorted(ids - answers.keys())
    extra = sorted(answers.keys() - ids)
    problems = []
    if missing:
        problems.append(f"{len(missing)} of {len(ids)} questions have no answer (first: {missing[:3]})")
    if extra:
        problems.append(f"{len(extra)} answers are for questions not in the set (first: {extra[:3]})")
    if problems:
        raise AnswersError(f"{where}: " + "; ".join(problems) + ": answers must come from this "
                           "evaluation set's questions, one per question")  # fmt: skip


def _pct(right: int, total: int) -> float:
    return 100.0 * right / total if total else 0.0


def score_gqa(items: Sequence[EvalItem], answers: Mapping[str, str]) -> BenchmarkScore:
    """Exact match after GQA's normalisation, over testdev-balanced."""
    correct = {i.key: gqa_normalise(answers[i.key]) == gqa_normalise(i.truth) for i in items}
    acc = _pct(sum(correct.values()), len(items))
    return BenchmarkScore("gqa", acc, {"accuracy": acc}, {"questions": len(items)}, correct)


def textvqa_accuracy(prediction: str, truths: Sequence[str]) -> float:
    """VQA accuracy of one answer: the mean over the ten leave-one-annotator-out subsets of
    min(#remaining annotators who gave it / 3, 1), answers compared after the VQA processor."""
    gold = [vqa_normalise(t) for t in truths]
    answer = vqa_normalise(prediction)
    if not gold:
        return 0.0
    accs = [min(1.0, sum(g == answer for j, g in enumerate(gold) if j != i) / 3) for i in range(len(gold))]
    return sum(accs) / len(accs)


def score_textvqa(items: Sequence[EvalItem], answers: Mapping[str, str]) -> BenchmarkScore:
    """Mean VQA accuracy over the questions (TextVQA val)."""
    per = {i.key: textvqa_accuracy(answers[i.key], i.truth) for i in items}
    acc = 100.0 * sum(per.values()) / len(items) if items else 0.0
    correct = {q: a > 0 for q, a in per.items()}
    return BenchmarkScore("textvqa", acc, {"accuracy": acc}, {"questions": len(items)}, correct)


def pope_metrics(labels: Sequence[str], predicted: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall and F1 of ``yes`` as the positive class, and the share of yes."""
    tp = sum(p == "yes" and t == "yes" for t, p in zip(labels, predicted, strict=True))
    fp = sum(p == "yes" and t == "no" for t, p in zip(labels, predicted, strict=True))
    tn = sum(p == "no" and t == "no" for t, p in zip(labels, predicted, strict=True))
    fn = sum(p == "no" and t == "yes" for t, p in zip(labels, predicted, strict=True))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    total = len(labels)
    return {"accuracy": (tp + tn) / total if total else 0.0, "precision": precision, "recall": recall,
            "f1": f1, "yes_ratio": (tp + fp) / total if total else 0.0}  # fmt: skip


def score_pope(items: Sequence[EvalItem], answers: Mapping[str, str]) -> BenchmarkScore:
    """POPE per split (adversarial, popular, random); the headline is their mean F1 in percent."""
    by_split: dict[str, list[EvalItem]] = defaultdict(list)
    for item in items:
        by_split[item.group.get("split", "all")].append(item)
    metrics: dict[str, float] = {}
    correct = {}
    for split, rows in sorted(by_split.items()):
        predicted = [pope_yes_no(answers[i.key]) for i in rows]
        for key, value in pope_metrics([i.truth for i in rows], predicted).items():
            metrics[f"{split}/{key}"] = value
        correct |= {i.key: p == i.truth for i, p in zip(rows, predicted, strict=True)}
    f1 = 100.0 * sum(metrics[f"{s}/f1"] for s in by_split) / len(by_split) if by_split else 0.0
    metrics["f1"] = f1
    counts = {"questions": len(items)} | {f"{s}/questions": len(r) for s, r in by_split.items()}
    return BenchmarkScore("pope", f1, metrics, counts, correct)


def score_mme(items: Sequence[EvalItem], answers: Mapping[str, str]) -> BenchmarkScore:
    """Per subtask accuracy (questions) + accuracy+ (images with every question right), x100;
    perception is the sum over its ten subtasks (out of 2000), cognition over its four."""
    correct = {i.key: mme_yes_no(answers[i.key]) == i.truth.lower() for i in items}
    unreadable = sum(mme_yes_no(answers[i.key]) == "other" for i in items)
    by_task: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for item in items:
        by_task[item.group["subtask"]][item.group["image"]].append(correct[item.key])
    metrics: dict[str, float] = {}
    for task, images in sorted(by_task.items()):
        flat = [ok for oks in images.values() for ok in oks]
        acc = _pct(sum(flat), len(flat))
        acc_plus = _pct(sum(all(oks) for oks in images.values()), len(images))
        metrics |= {f"{task}/acc": acc, f"{task}/acc_plus": acc_plus, f"{task}/score": acc + acc_plus}
    perception = sum(metrics.get(f"{t}/score", 0.0) for t in MME_PERCEPTION)
    cognition = sum(metrics.get(f"{t}/score", 0.0) for t in MME_COGNITION)
    metrics |= {"perception": perception, "cognition": cognition}
    counts = {"questions": len(items), "images": sum(len(v) for v in by_task.values()),
              "subtasks": len(by_task), "unreadable": unreadable}  # fmt: skip
    return BenchmarkScore("mme", perception, metrics, counts, correct)


def score_sqa(items: Sequence[EvalItem], answers: Mapping[str, str]) -> BenchmarkScore:
    """Option accuracy; the headline is over the questions with an image (SQA-IMG)."""
    letters = {i.key: sqa_letter(answers[i.key].strip(), "".join(i.options)) for i in items}
    correct = {i.key: letters[i.key] == i.truth for i in items}
    with_image = [i for i in items if i.group.get("has_image", "1") == "1"]
    img = _pct(sum(correct[i.key] for i in with_image), len(with_image))
    metrics = {"img_accuracy": img, "accuracy": _pct(sum(correct.values()), len(items))}
    counts = {"questions": len(items), "image_questions": len(with_image),
              "unreadable": sum(v is None for v in letters.values())}  # fmt: skip
    return BenchmarkScore("sqa", img, metrics, counts, correct)


def score_mmbench(items: Sequence[EvalItem], answers: Mapping[str, str]) -> BenchmarkScore:
    """Circular evaluation: a question counts as right only when every rotation of its options
    (the rows sharing its base index) is answered right; also per category and single-pass."""
    letters = {i.key: mmbench_letter(answers[i.key], i.options) for i in items}
    correct = {i.key: letters[i.key] == i.truth for i in items}
    groups: dict[str, list[EvalItem]] = defaultdict(list)
    for item in items:
        groups[item.group["base"]].append(item)
    circular = {b: all(correct[i.key] for i in rows) for b, rows in groups.items()}
    first = [i for i in items if int(i.question_id) < MMBENCH_ROTATION]
    single = _pct(sum(correct[i.key] for i in first), len(first))
    metrics = {"circular_accuracy": _pct(sum(circular.values()), len(groups)), "single_pass_accuracy": single}
    by_category: dict[str, list[bool]] = defaultdict(list)
    for base, rows in groups.items():
        by_category[rows[0].group.get("category", "")].append(circular[base])
    metrics |= {f"category/{c}": _pct(sum(v), len(v)) for c, v in sorted(by_category.items()) if c}
    counts = {"questions": len(groups), "rows": len(items),
              "unmatched": sum(v is None for v in letters.values())}  # fmt: skip
    return BenchmarkScore("mmbench", metrics["circular_accuracy"], metrics, counts, correct)


SCORERS: dict[str, Callable[[Sequence[EvalItem], Mapping[str, str]], BenchmarkScore]] = {
    "gqa": score_gqa, "sqa": score_sqa, "textvqa": score_textvqa, "pope": score_pope, "mme": score_mme,
    "mmbench": score_mmbench,
}  # fmt: skip
"""Benchmark -> scorer."""


def score(
    benchmark: str, items: Sequence[EvalItem], answers: Mapping[str, str], where: str
) -> BenchmarkScore:
    """Check that ``answers`` fit ``items`` and score them by ``benchmark``'s rules."""
    if benchmark not in SCORERS:
        raise KeyError(f"unknown benchmark {benchmark!r}; known: {', '.join(BENCHMARKS)}")
    check_answers(items, answers, where)
    return SCORERS[benchmark](items, answers)


def average(headlines: Mapping[str, float]) -> float | None:
    """The papers' average: the five percentages and MME perception / 20, over all six (else None)."""
    if any(b not in headlines for b in BENCHMARKS):
        return None
    return sum(headlines[b] / (20 if b == "mme" else 1) for b in BENCHMARKS) / len(BENCHMARKS)
