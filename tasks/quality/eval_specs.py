"""Evaluation-set specs: one YAML file per benchmark set in ``eval_specs/``, validated like dataset
specs (same YAML reader, same ``file:line: field: message`` errors).

A spec names its benchmark, the files in the layout the MobileVLM authors' and LLaVA's evaluation
scripts read (relative to the data root), the instruction the authors append to each question and
how long answers may be. Real-profile specs fetch the public files through ``downloads``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tasks.core.yaml_lines import model_at, parse_yaml, problems_of
from tasks.data.specs import Download

EVAL_SPEC_DIR = Path(__file__).resolve().parents[2] / "eval_specs"

FILE_ROLES: dict[str, dict[str, str]] = {
    "gqa": {"questions": "llava_gqa_testdev_balanced.jsonl (question_id, image, text)",
            "answers": "testdev_balanced_questions.json (question id -> {answer, ...})",
            "images": "the GQA images folder"},
    "textvqa": {"questions": "llava_textvqa_val_v051_ocr.jsonl (question_id, image, text with OCR tokens)",
                "annotations": "TextVQA_0.5.1_val.json ({data: [{image_id, question, answers}]})",
                "images": "train_images folder"},
    "pope": {"questions": "llava_pope_test.jsonl (question_id, image, text, category)",
             "labels": "folder of coco_pope_{adversarial,popular,random}.json (one json per line with label)",
             "images": "COCO val2014 folder"},
    "mme": {"questions": "llava_mme.jsonl (question_id, image, text, category)",
            "release": "MME_Benchmark_release_version folder (per subtask: image + question/answer txt)"},
    "sqa": {"questions": "llava_test_CQM-A.json (id, image, conversations)",
            "problems": "ScienceQA problems.json (pid -> {choices, answer, ...})",
            "splits": "ScienceQA pid_splits.json ({test: [pid, ...]})",
            "images": "ScienceQA test images folder"},
    "mmbench": {"questions": "mmbench_dev_en_*.tsv (index, question, hint, A-D, answer, category, image)"},
}  # fmt: skip
"""Benchmark -> the files its spec names (role -> what it is), in the authors' layout."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)


class EvalSpec(_Strict):
    """An evaluation set: one of the papers' benchmarks, in its published files."""

    schema_version: Literal[1] = 1
    """Version of this schema."""
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    """Unique set name (used in recipes and on the command line)."""
    kind: Literal["eval"]
    """Always ``eval`` (dataset specs are ``text``, ``image_text``, ``instruct`` or ``chat``)."""
    benchmark: Literal["gqa", "sqa", "textvqa", "pope", "mme", "mmbench"]
    """Which benchmark's file layout and scoring rules apply."""
    profile: Literal["real", "tiny"] = "real"
    """``real``: the published files; ``tiny``: replicas from ``mvlm data make-samples``."""
    description: str = ""
    """Free text for people."""
    license: str
    """License of the benchmark data."""
    files: dict[str, str]
    """Role -> path relative to the data root; the roles each benchmark needs are in ``FILE_ROLES``."""
    instruction: str
    """The authors' instruction, put on its own line after each question that does not already end
    with it (e.g. "Answer the question using a single word or phrase.")."""
    max_new_tokens: int = Field(default=16, gt=0)
    """Longest answer decoded, in tokens (greedy decoding stops earlier at the end of the answer)."""
    limit: int | None = Field(default=None, gt=0)
    """Only the first ``limit`` questions in file order (MMBench: base questions with all their
    rotations), for quick checks; None: all."""
    max_failure_ratio: float = Field(default=0.0, ge=0.0, le=1.0)
    """Largest share of questions that may be set aside (missing image, no reference, ...) before the
    evaluation fails; 0: every question of the benchmark must be asked."""
    downloads: list[Download] = []
    """Published files fetched (and unpacked) under the data root before the first evaluation."""
    allow_hosts: list[str] = []
    """Hosts or networks downloads may reach besides public addresses."""

    @model_validator(mode="after")
    def _roles(self) -> EvalSpec:
        needed = FILE_ROLES[self.benchmark]
        missing = [r for r in needed if r not in self.files]
        unknown = [r for r in self.files if r not in needed]
        if missing or unknown:
            wanted = "; ".join(f"{r}: {what}" for r, what in needed.items())
            raise ValueError(f"benchmark {self.benchmark!r} reads files {list(needed)} "
                             f"(missing {missing}, unknown {unknown}); {wanted}")  # fmt: skip
        return self


class EvalSpecError(ValueError):
    """Problems in evaluation specs, each naming file, line and field."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _model_at(loc: tuple) -> type[BaseModel] | None:
    return model_at(EvalSpec, loc)


def parse_eval_spec(text: str, file: str = "<eval spec>") -> EvalSpec:
    """Validate YAML text as an EvalSpec; errors list ``file:line: field.path: message``."""
    try:
        data, line_map = parse_yaml(text, file)
    except ValueError as err:
        raise EvalSpecError([str(err)]) from None
    if not isinstance(data, dict):
        raise EvalSpecError(
            [f"{file}:1: an eval spec must be a mapping of fields, got {type(data).__name__}"]
        )
    try:
        return EvalSpec.model_validate(data)
    except ValidationError as err:
        raise EvalSpecError(problems_of(err, file, data, line_map, _model_at, top="(spec)")) from None


def eval_spec_dir() -> Path:
    """The folder of evaluation specs: ``MVLM_EVAL_SPEC_DIR`` or ``eval_specs/``."""
    return Path(os.environ.get("MVLM_EVAL_SPEC_DIR") or EVAL_SPEC_DIR)


def load_eval_spec(path: str | Path) -> EvalSpec:
    """Read and validate one evaluation spec (its name must equal its file name)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise EvalSpecError([f"{path}: cannot read eval spec ({err})"]) from err
    spec = parse_eval_spec(text, str(path))
    if spec.name != path.stem:
        raise EvalSpecError(
            [f"{path}:1: name: spec name {spec.name!r} must equal the file name {path.stem!r}"]
        )
    return spec


def load_eval_specs(folder: str | Path | None = None) -> dict[str, tuple[Path, EvalSpec]]:
    """Every evaluation spec by name; EvalSpecError lists every problem in every file."""
    specs: dict[str, tuple[Path, EvalSpec]] = {}
    problems: list[str] = []
    for file in sorted(Path(folder or eval_spec_dir()).glob("*.yaml")):
        try:
            spec = load_eval_spec(file)
        except EvalSpecError as err:
            problems.extend(err.problems)
            continue
        specs[spec.name] = (file, spec)
    if problems:
        raise EvalSpecError(problems)
    return specs


def find_eval_spec(name: str, folder: str | Path | None = None) -> tuple[Path, EvalSpec]:
    """The evaluation spec called ``name``; KeyError lists the known names."""
    specs = load_eval_specs(folder)
    if name not in specs:
        raise KeyError(f"no evaluation spec named {name!r}; known: {', '.join(sorted(specs)) or '(none)'}")
    return specs[name]
