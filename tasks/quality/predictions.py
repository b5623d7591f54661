"""Answers files: ours in the authors' format (jsonl with ``question_id``, ``prompt``, ``text``), read
back from any tool that writes that format, and the files the official evaluation servers take
(GQA's predictions json, MMBench's submission xlsx, MME's per-subtask result txt)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from tasks.core.identity import atomic_path, atomic_write_json, atomic_write_text
from tasks.quality.answers import gqa_normalise
from tasks.quality.eval_sets import first_line
from tasks.quality.scoring import AnswersError, EvalItem

REPEATED_IDS = ("mme", "textvqa")
"""Benchmarks whose ``question_id`` repeats per image: answers are matched with the question too."""


def answer_key(benchmark: str, question_id: object, prompt: str) -> str:
    """The item key an answers-file row belongs to."""
    if benchmark in REPEATED_IDS:
        return f"{question_id}|{first_line(prompt.removeprefix('<image>').strip())}"
    return str(question_id)


def _prompt(benchmark: str, item: EvalItem) -> str:
    # ScienceQA's scorer counts a question as an image question when its prompt holds <image>
    return f"<image>\n{item.prompt}" if benchmark == "sqa" and item.image else item.prompt


def write_answers(
    path: Path, benchmark: str, items: Sequence[EvalItem], answers: Mapping[str, str], model_id: str
) -> Path:
    """The answers as the authors' scripts write them, one row per question in question order."""
    rows = []
    for item in items:
        row = {"question_id": item.question_id, "prompt": _prompt(benchmark, item), "text": answers[item.key],
               "answer_id": hashlib.sha256(f"{model_id}|{item.key}".encode()).hexdigest()[:22],
               "model_id": model_id, "metadata": {}}  # fmt: skip
        if benchmark == "mmbench":
            row |= {"round_id": 0, "options": list(item.options.values()), "option_char": list(item.options)}
        rows.append(json.dumps(row, ensure_ascii=False))
    atomic_write_text(path, "\n".join(rows) + "\n")
    return path


def read_answers(path: Path, benchmark: str) -> dict[str, str]:
    """Item key -> answer text of an answers file; AnswersError names the line of a malformed,
    incomplete or repeated row."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise AnswersError(f"{path}: cannot read the answers file ({err})") from None
    answers: dict[str, str] = {}
    seen: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise AnswersError(f"{path}:{number}: not a JSON object; answers files are jsonl") from None
        if not isinstance(row, dict) or "question_id" not in row or not isinstance(row.get("text"), str):
            raise AnswersError(f"{path}:{number}: a row needs question_id and text (the authors' format)")
        if benchmark in REPEATED_IDS and not isinstance(row.get("prompt"), str):
            raise AnswersError(
                f"{path}:{number}: {benchmark} answers need their prompt (ids repeat per image)"
            )
        key = answer_key(benchmark, row["question_id"], row.get("prompt", ""))
        if key in seen:
            raise AnswersError(
                f"{path}:{number}: a second answer to question {key!r} (first at line {seen[key]})"
            )
        seen[key] = number
        answers[key] = row["text"]
    return answers


def write_official(
    benchmark: str, items: Sequence[EvalItem], answers: Mapping[str, str], folder: Path
) -> list[Path]:
    """The files the benchmark's evaluation server or official tool reads, where it has one."""
    if benchmark == "gqa":
        rows = [
            {"questionId": str(i.question_id), "prediction": gqa_normalise(answers[i.key])} for i in items
        ]
        return [atomic_write_json(folder / "testdev_balanced_predictions.json", rows)]
    if benchmark == "mme":
        return _mme_results(items, answers, folder / "mme_results")
    if benchmark == "mmbench":
        return [_mmbench_submission(items, answers, folder / "mmbench_submission.xlsx")]
    return []


def _mme_results(items: Sequence[EvalItem], answers: Mapping[str, str], folder: Path) -> list[Path]:
    by_task: dict[str, list[str]] = {}
    for item in items:
        stem = Path(item.group["image"]).stem
        text = " ".join(answers[item.key].split())  # MME's tool splits on tabs and reads line pairs
        line = "\t".join((f"{stem}.txt", item.group["mme_question"], item.truth.capitalize(), text))
        by_task.setdefault(item.group["subtask"], []).append(line)
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        for task, lines in by_task.items():
            (tmp / f"{task}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [folder / f"{task}.txt" for task in by_task]


def _mmbench_submission(items: Sequence[EvalItem], answers: Mapping[str, str], path: Path) -> Path:
    from openpyxl import Workbook

    book = Workbook()
    sheet = book.active
    sheet.append(["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"])
    for item in items:
        options = [item.options.get(c, "") for c in "ABCD"]
        question = item.group.get("question", "")
        sheet.append([item.question_id, question, *options, answers[item.key], item.truth, "dev"])
    with atomic_path(path) as tmp:
        book.save(tmp)
    return path
