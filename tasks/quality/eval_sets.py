"""The six benchmarks' files, as the authors lay them out, read into ``EvalItem``s.

Each reader keeps the question file's order (POPE and MME pair by position), puts the authors'
instruction after each question that lacks it, finds each question's reference and image, and sets
aside what cannot be asked or scored (missing image, no reference, duplicate question, an answer
that is not an option) as counted rejects. ``read_eval_set`` fails when rejects exceed the spec's
``max_failure_ratio`` (0 by default: a benchmark with questions missing is not that benchmark).
"""

from __future__ import annotations

import csv
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.data.rejects import Rejects
from tasks.quality.eval_files import EvalSetError, image_reject, inside, missing_fields, read_json, read_jsonl
from tasks.quality.eval_specs import EvalSpec
from tasks.quality.scoring import MMBENCH_ROTATION, EvalItem

LETTERS = "ABCDE"
POPE_SPLITS = ("adversarial", "popular", "random")
MME_ASK = "Please answer yes or no."
"""MME's own instruction, part of the questions in its answer files."""


@dataclass
class EvalSet:
    """An evaluation set read from its files."""

    spec: EvalSpec
    """Its spec."""
    items: list[EvalItem]
    """The questions that can be asked and scored, in question-file order."""
    rejects: Rejects = field(default_factory=Rejects)
    """Questions set aside, with the reason."""

    @property
    def read(self) -> int:
        """Questions in the files (asked + set aside)."""
        return len(self.items) + len(self.rejects.items)


def with_instruction(question: str, instruction: str) -> str:
    """The question with the authors' instruction on its own last line (added once)."""
    question = question.rstrip()
    return question if question.endswith(instruction) else f"{question}\n{instruction}"


def first_line(prompt: str) -> str:
    """The question of a prompt whose later lines are OCR tokens or the instruction."""
    return prompt.split("\n", 1)[0].strip()


class _Reader:
    """Shared bookkeeping of one reading: rejects, seen keys, image checks."""

    def __init__(self, spec: EvalSpec, root: Path) -> None:
        self.spec, self.root, self.rejects = spec, root, Rejects()
        self.keys: dict[str, str] = {}

    def path(self, role: str) -> Path:
        return self.root / self.spec.files[role]

    def reject(self, reason: str, where: str, detail: str, excerpt: Any = "") -> None:
        file, _, line = where.rpartition(":")
        self.rejects.add(reason, self.spec.name, file, line, detail, str(excerpt)[:300])

    def new_key(self, key: str, where: str) -> bool:
        if key in self.keys:
            self.reject("duplicate_question", where, f"question {key!r} was already read at {self.keys[key]}")
            return False
        self.keys[key] = where
        return True

    def image(self, folder: Path, relative: Any, where: str) -> str | None:
        path = inside(folder, relative)
        if path is None:
            self.reject("unsafe_path", where, f"image path {relative!r} leaves {folder} or is not a path")
            return None
        if bad := image_reject(str(path)):
            self.reject(*bad[:1], where, bad[1])
            return None
        return str(path)


def _jsonl_questions(r: _Reader, fields: tuple[str, ...]) -> Iterator[tuple[str, dict[str, Any]]]:
    path = r.path("questions")
    for number, row in read_jsonl(path, r.rejects, r.spec.name):
        where = f"{path}:{number}"
        if missing := missing_fields(row, fields):
            r.reject("missing_field", where, f"no {missing} in the question", row)
            continue
        yield where, row


def read_gqa(r: _Reader) -> list[EvalItem]:
    answers = read_json(r.path("answers"), "GQA answers")
    items = []
    for where, row in _jsonl_questions(r, ("question_id", "image", "text")):
        qid = str(row["question_id"])
        truth = answers.get(qid, {}).get("answer") if isinstance(answers.get(qid), dict) else None
        if truth is None:
            r.reject("no_reference", where, f"question {qid} is not in {r.path('answers')}")
        elif r.new_key(qid, where) and (image := r.image(r.path("images"), row["image"], where)):
            items.append(
                EvalItem(
                    qid, row["question_id"], with_instruction(row["text"], r.spec.instruction), image, truth
                )
            )
    return items


def read_textvqa(r: _Reader) -> list[EvalItem]:
    data = read_json(r.path("annotations"), "TextVQA annotations")
    rows = data.get("data")
    if not isinstance(rows, list):
        raise EvalSetError(f"{r.path('annotations')}: no 'data' list: is this TextVQA_0.5.1_val.json?")
    truth = {
        (str(a.get("image_id")), str(a.get("question", "")).lower()): a.get("answers")
        for a in rows
        if isinstance(a, dict)
    }
    items = []
    for where, row in _jsonl_questions(r, ("question_id", "image", "text")):
        question = first_line(row["text"])
        answers = truth.get((str(row["question_id"]), question.lower()))
        key = f"{row['question_id']}|{question}"
        if not isinstance(answers, list) or not answers:
            r.reject("no_reference", where, f"no annotation for image {row['question_id']} and {question!r}")
        elif r.new_key(key, where) and (image := r.image(r.path("images"), row["image"], where)):
            prompt = with_instruction(row["text"], r.spec.instruction)
            items.append(EvalItem(key, row["question_id"], prompt, image, [str(a) for a in answers]))
    return items


def read_pope(r: _Reader) -> list[EvalItem]:
    by_split: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for where, row in _jsonl_questions(r, ("question_id", "image", "text", "category")):
        by_split.setdefault(str(row["category"]), []).append((where, row))
    items = []
    for split, rows in by_split.items():
        labels_file = r.path("labels") / f"coco_pope_{split}.json"
        labels = [row for _, row in read_jsonl(labels_file, r.rejects, r.spec.name)]
        if len(labels) != len(rows):
            raise EvalSetError(
                f"{labels_file}: {len(labels)} labels but {len(rows)} {split} questions in "
                f"{r.path('questions')}; POPE pairs them by position: use the label files of POPE commit "
                "e3e39262 (output/coco), which LLaVA's question file was made from"
            )
        for (where, row), label in zip(rows, labels, strict=True):
            if label.get("image") != row["image"]:
                raise EvalSetError(
                    f"{where}: question on {row['image']} but the label at the same position "
                    f"in {labels_file} is for {label.get('image')}: the files are out of step"
                )
            key = str(row["question_id"])
            if r.new_key(key, where) and (image := r.image(r.path("images"), row["image"], where)):
                truth = label.get("label")
                if truth not in ("yes", "no"):
                    r.reject("no_reference", where, f"label {truth!r} in {labels_file} is neither yes nor no")
                    continue
                prompt = with_instruction(row["text"], r.spec.instruction)
                items.append(EvalItem(key, row["question_id"], prompt, image, truth, {"split": split}))
    return items


def _mme_truths(release: Path, subtask: str, stem: str) -> dict[str, str]:
    folder = release / subtask
    for txt in (folder / "questions_answers_YN" / f"{stem}.txt", folder / f"{stem}.txt"):
        if txt.is_file():
            lines = txt.read_text(encoding="utf-8", errors="replace").splitlines()
            return {q.strip(): a.strip() for q, _, a in (line.partition("\t") for line in lines) if a}
    return {}


def read_mme(r: _Reader) -> list[EvalItem]:
    release = r.path("release")
    items = []
    for where, row in _jsonl_questions(r, ("question_id", "image", "text", "category")):
        subtask, question = str(row["category"]), first_line(row["text"])
        stem = Path(str(row["image"])).stem
        truths = _mme_truths(release, subtask, stem)
        asked = next((q for q in (f"{question} {MME_ASK}", f"{question}  {MME_ASK}") if q in truths), "")
        truth = truths.get(asked)
        key = f"{row['question_id']}|{question}"
        if truth not in ("Yes", "No"):
            r.reject(
                "no_reference", where, f"no Yes/No answer to {question!r} in {release / subtask} ({stem}.txt)"
            )
        elif r.new_key(key, where) and (image := r.image(release, row["image"], where)):
            prompt = with_instruction(row["text"], r.spec.instruction)
            group = {"subtask": subtask, "image": str(row["image"]), "mme_question": asked}
            items.append(EvalItem(key, row["question_id"], prompt, image, truth.lower(), group))
    return items


def _valid_answer(problem: dict[str, Any]) -> bool:
    choices, answer = problem.get("choices"), problem.get("answer")
    return isinstance(choices, list) and 0 < len(choices) <= len(LETTERS) and answer in range(len(choices))


def read_sqa(r: _Reader) -> list[EvalItem]:
    questions = read_json(r.path("questions"), "ScienceQA questions", list)
    problems = read_json(r.path("problems"), "ScienceQA problems")
    test = {str(pid) for pid in read_json(r.path("splits"), "ScienceQA splits").get("test", [])}
    items = []
    for number, row in enumerate(questions):
        where = f"{r.path('questions')}:[{number}]"
        pid = str(row.get("id")) if isinstance(row, dict) else None
        turns = row.get("conversations") if isinstance(row, dict) else None
        problem = problems.get(pid) if pid else None
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], dict):
            r.reject("missing_field", where, "no conversations with a first human turn", row)
        elif pid not in test or not isinstance(problem, dict):
            r.reject("no_reference", where, f"problem {pid} is not in the test split of {r.path('problems')}")
        elif not _valid_answer(problem):
            count = len(problem.get("choices") or [])
            r.reject(
                "unknown_option", where, f"answer {problem.get('answer')!r} is not one of {count} choices"
            )
        elif r.new_key(pid, where):
            image = r.image(r.path("images"), row["image"], where) if row.get("image") else None
            if row.get("image") and image is None:
                continue
            text = str(turns[0].get("value", "")).replace("<image>", "").strip()
            answer, choices = problem["answer"], problem["choices"]
            options = dict(zip(LETTERS, map(str, choices), strict=False))
            group = {"has_image": "1" if image else "0"}
            items.append(
                EvalItem(
                    pid,
                    pid,
                    with_instruction(text, r.spec.instruction),
                    image,
                    LETTERS[answer],
                    group,
                    options,
                )
            )
    return items


def _none(value: Any) -> bool:
    return (
        value is None
        or (isinstance(value, float) and math.isnan(value))
        or str(value).strip().lower() in ("", "nan", "none")
    )


def read_mmbench(r: _Reader) -> list[EvalItem]:
    path = r.path("questions")
    csv.field_size_limit(sys.maxsize)
    try:
        handle = open(path, encoding="utf-8", newline="")  # noqa: SIM115
    except OSError as err:
        raise EvalSetError(f"{path}: cannot read the MMBench tsv ({err.strerror})") from None
    items = []
    with handle:
        reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        need = ("index", "question", "hint", "A", "B", "answer", "category", "image")
        if absent := [c for c in need if c not in (reader.fieldnames or [])]:
            raise EvalSetError(f"{path}:1: columns {absent} missing: is this an MMBench dev tsv?")
        for number, row in enumerate(reader, start=2):
            where = f"{path}:{number}"
            options = {c: row[c].strip() for c in "ABCD" if c in row and not _none(row[c])}
            if not str(row["index"]).strip().isdigit():
                r.reject("missing_field", where, f"index {row['index']!r} is not a number", row["index"])
            elif row["answer"] not in options:
                r.reject("unknown_option", where, f"answer {row['answer']!r} is not one of {list(options)}")
            elif r.new_key(key := str(int(row["index"])), where):
                question = row["question"] if _none(row["hint"]) else f"{row['hint']}\n{row['question']}"
                question += "".join(f"\n{c}. {text}" for c, text in options.items())
                group = {"base": str(int(key) % MMBENCH_ROTATION), "category": row["category"],
                         "question": row["question"]}  # fmt: skip
                image = f"base64:{row['image'].strip()}"
                if bad := image_reject(image):
                    r.reject(bad[0], where, bad[1])
                    continue
                items.append(
                    EvalItem(
                        key,
                        int(key),
                        with_instruction(question, r.spec.instruction),
                        image,
                        row["answer"],
                        group,
                        options,
                    )
                )
    return items


READERS: dict[str, Callable[[_Reader], list[EvalItem]]] = {
    "gqa": read_gqa,
    "textvqa": read_textvqa,
    "pope": read_pope,
    "mme": read_mme,
    "sqa": read_sqa,
    "mmbench": read_mmbench,
}


def _unit(item: EvalItem) -> str:
    """What ``limit`` counts: an MME image (two questions), an MMBench question (all rotations)."""
    return item.group.get("image") or item.group.get("base") or item.key


def limited(items: list[EvalItem], limit: int | None) -> list[EvalItem]:
    """The items of the first ``limit`` units in file order (all items when None)."""
    if limit is None:
        return items
    units: dict[str, None] = {}
    for item in items:
        if len(units) < limit:
            units.setdefault(_unit(item))
    return [i for i in items if _unit(i) in units]


def read_eval_set(spec: EvalSpec, data_root: str | Path) -> EvalSet:
    """The spec's questions; EvalSetError when files are unusable or too many questions are rejected."""
    reader = _Reader(spec, Path(data_root))
    for role in spec.files:
        if not reader.path(role).exists():
            raise EvalSetError(
                f"eval spec {spec.name}: files.{role} {reader.path(role)} does not exist: "
                "fetch the benchmark's files (see the spec's downloads) or fix the path"
            )
    items = READERS[spec.benchmark](reader)
    out = EvalSet(spec, limited(items, spec.limit), reader.rejects)
    ratio = len(out.rejects.items) / max(out.read, 1)
    if not out.items or ratio > spec.max_failure_ratio:
        counts = ", ".join(f"{k}: {v}" for k, v in out.rejects.counts().items()) or "none"
        first = "; ".join(f"{x.source}:{x.where}: {x.reason}: {x.detail}" for x in out.rejects.items[:3])
        raise EvalSetError(
            f"eval spec {spec.name}: {len(out.rejects.items)} of {out.read} questions cannot be asked or "
            f"scored ({counts}; max_failure_ratio {spec.max_failure_ratio}); first: {first or 'no questions'}"
        )
    return out
