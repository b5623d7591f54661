"""One harness for every model and backend: read an evaluation set, ask every question, write the
answers (the authors' format and the official servers' files), score by the official rules.

An evaluation's identity is the model's identity, the set's identity (its spec and the content of
every question, reference and image it asks), the backend and the code version; a finished
evaluation with the same identity is read back instead of re-run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from model.prefetch import ahead
from tasks.core.identity import atomic_write_json, canonical_json, code_version, hash_json, sha256_file
from tasks.data.builder import BuildError
from tasks.data.downloads import ensure_downloads
from tasks.data.image_checks import ImageRejected
from tasks.quality.backends import Answerer, ModelRef, open_answerer
from tasks.quality.eval_files import EvalSetError, load_image
from tasks.quality.eval_sets import EvalSet, read_eval_set
from tasks.quality.eval_specs import EvalSpec
from tasks.quality.predictions import read_answers, write_answers, write_official
from tasks.quality.scoring import BenchmarkScore, EvalItem, score

log = logging.getLogger(__name__)
ANSWERS_FILE = "answers.jsonl"
RESULT_FILE = "result.json"
CHUNK = 256
"""Questions handed to the answerer at a time (the next chunk's images load meanwhile)."""


class EvalRunError(RuntimeError):
    """An evaluation that could not finish (an image that no longer decodes, a backend failure)."""


@dataclass
class BenchmarkRun:
    """One model answering one evaluation set."""

    eval_set: str
    """The evaluation spec's name."""
    benchmark: str
    """Which of the six benchmarks."""
    eval_identity: str
    """Content identity of the set as asked (spec, questions, references, images)."""
    model: str
    """What answered: a checkpoint or GGUF path, or a registered model version."""
    backend: str
    """``pytorch`` or ``llama.cpp/<quant type>``."""
    identity: str
    """Identity of this evaluation (model, set, backend, code version)."""
    score: BenchmarkScore
    """Scores by the official rules."""
    questions: int
    """Questions asked."""
    seconds: float
    """Wall time answering (without reading the set or scoring)."""
    folder: str
    """Where the answers, official files and this result are."""
    rejects: dict[str, int] = field(default_factory=dict)
    """Questions of the files set aside when reading, by reason."""
    official_files: list[str] = field(default_factory=list)
    """The files the benchmark's evaluation server or official tool reads."""

    @property
    def questions_per_s(self) -> float:
        """Answering throughput."""
        return self.questions / self.seconds if self.seconds > 0 else 0.0

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BenchmarkRun:
        """Read back a result written by ``run_benchmark``."""
        return cls(**(data | {"score": BenchmarkScore(**data["score"])}))


def eval_set_identity(eval_set: EvalSet) -> str:
    """Hash of the spec and of every item as asked: key, prompt, reference and image bytes."""
    digest = hashlib.sha256(canonical_json(eval_set.spec.model_dump(mode="json")).encode())
    seen: dict[str, str] = {}
    for item in eval_set.items:
        image = item.image or ""
        if image and not image.startswith("base64:"):
            image = seen.setdefault(image, sha256_file(image))
        elif image:
            image = hashlib.sha256(image.encode()).hexdigest()
        digest.update(canonical_json([item.key, item.prompt, item.truth, image, item.options]).encode())
    return digest.hexdigest()[:16]


def run_identity(model_identity: str, eval_identity: str, backend: str) -> str:
    """Identity of one model x set x backend evaluation."""
    return hash_json({"model": model_identity, "eval": eval_identity, "backend": backend,
                      "code": code_version("evaluator")})  # fmt: skip


def ask(answerer: Answerer, items: Sequence[EvalItem], max_new_tokens: int,
        progress: Callable[[int], None] | None = None) -> dict[str, str]:  # fmt: skip
    """Item key -> the answerer's answer, asked in chunks with their images loaded."""
    answers: dict[str, str] = {}
    chunks = [items[start : start + CHUNK] for start in range(0, len(items), CHUNK)]
    for chunk, images in ahead(chunks, lambda chunk: [_image(item) for item in chunk]):
        got = answerer.answer([item.prompt for item in chunk], images, max_new_tokens)
        answers.update(zip((item.key for item in chunk), got, strict=True))
        if progress:
            progress(len(chunk))
    return answers


def _image(item: EvalItem) -> Any:
    if item.image is None:
        return None
    try:
        return load_image(item.image)
    except ImageRejected as err:
        where = item.image if not item.image.startswith("base64:") else f"question {item.key}"
        raise EvalRunError(f"{where}: {err.args[1]} (it was readable when the set was read)") from None


def run_benchmark(
    answerer: Answerer, eval_set: EvalSet, folder: Path, model: str, model_identity: str,
    progress: Callable[[int], None] | None = None, eval_identity: str | None = None,
) -> BenchmarkRun:  # fmt: skip
    """Ask ``eval_set`` with ``answerer``, write answers + official files + result under ``folder``
    and return the scores; a result with the same identity already there is returned as it is."""
    spec = eval_set.spec
    eval_identity = eval_identity or eval_set_identity(eval_set)
    identity = run_identity(model_identity, eval_identity, answerer.name)
    if (done := _finished(folder, identity)) is not None:
        log.debug("%s on %s: already evaluated (%s)", answerer.name, spec.name, identity)
        return done
    start = time.perf_counter()
    answers = ask(answerer, eval_set.items, spec.max_new_tokens, progress)
    seconds = time.perf_counter() - start
    answers_file = write_answers(folder / ANSWERS_FILE, spec.benchmark, eval_set.items, answers, model)
    scored = score_file(eval_set, answers_file)  # the file as written is what is scored
    official = write_official(spec.benchmark, eval_set.items, answers, folder)
    run = BenchmarkRun(spec.name, spec.benchmark, eval_identity, model, answerer.name, identity, scored,
                       len(eval_set.items), seconds, str(folder), eval_set.rejects.counts(),
                       [str(p) for p in official])  # fmt: skip
    atomic_write_json(folder / RESULT_FILE, asdict(run))
    return run


def _finished(folder: Path, identity: str) -> BenchmarkRun | None:
    path = folder / RESULT_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if data.get("identity") != identity or not (folder / ANSWERS_FILE).is_file():
        return None
    return BenchmarkRun.from_json(data)


def score_file(eval_set: EvalSet, answers_file: Path) -> BenchmarkScore:
    """Score an existing answers file (any tool's, in the authors' jsonl format) by the set's rules."""
    spec = eval_set.spec
    return score(
        spec.benchmark, eval_set.items, read_answers(answers_file, spec.benchmark), str(answers_file)
    )


def fetched(spec: EvalSpec, data_root: Path) -> EvalSpec:
    """``spec`` once its ``downloads`` are fetched (or found finished) under ``data_root``."""
    if spec.downloads:
        try:
            ensure_downloads(spec, data_root)  # type: ignore[arg-type]  (the same download fields)
        except BuildError as err:
            raise EvalSetError(f"eval {err}") from None
    return spec


def evaluate_model(
    ref: ModelRef, specs: Sequence[EvalSpec], data_root: Path, out_root: Path, template: str = "v1",
    threads: int = 2, progress: Callable[[str, int, int], None] | None = None,
) -> list[BenchmarkRun]:  # fmt: skip
    """Every set of ``specs`` asked of one model, in order; the sets are all read (and any bad one
    refused) before the model is loaded. ``progress(set name, done, total)`` follows the questions."""
    sets = [read_eval_set(fetched(spec, data_root), data_root) for spec in specs]
    folder = out_root / ref.identity / ref.backend.replace("/", "-")
    answerer = _Lazy(ref, template, threads)
    runs = []
    try:
        for eval_set in sets:
            name, total, done = eval_set.spec.name, len(eval_set.items), [0]

            def step(n: int, name: str = name, total: int = total, done: list[int] = done) -> None:
                done[0] += n
                if progress:
                    progress(name, done[0], total)

            runs.append(run_benchmark(answerer, eval_set, folder / name, str(ref.path), ref.identity, step))
    finally:
        answerer.close()
    asked = sum(r.questions for r in runs)
    log.info("%s: %d questions of %d sets %s", ref.backend, asked, len(runs),
             "asked" if answerer.opened else "already answered; reusing")  # fmt: skip
    return runs


class _Lazy:
    """The model's answerer, loaded on the first question (not at all when every result exists)."""

    def __init__(self, ref: ModelRef, template: str, threads: int) -> None:
        self.ref, self.template, self.threads, self.name = ref, template, threads, ref.backend
        self.loaded: Answerer | None = None

    @property
    def opened(self) -> bool:
        """Whether the model was loaded."""
        return self.loaded is not None

    def answer(self, questions: Sequence[str], images: Sequence[Any], max_new_tokens: int) -> list[str]:
        """The loaded answerer's answers."""
        if self.loaded is None:
            self.loaded = open_answerer(self.ref, self.template, self.threads)
        return self.loaded.answer(questions, images, max_new_tokens)

    def close(self) -> None:
        """Free the model if it was loaded."""
        if self.loaded is not None:
            self.loaded.close()


def agreement(reference_folder: str | Path, other_folder: str | Path) -> dict[str, float]:
    """How two models' answers to the same set compare, question by question: the share of
    identical answers (after trimming and lowercasing) and of questions both got right or both wrong."""
    runs = [BenchmarkRun.from_json(json.loads((Path(f) / RESULT_FILE).read_text(encoding="utf-8")))
            for f in (reference_folder, other_folder)]  # fmt: skip
    benchmark = runs[0].benchmark
    ref, other = (read_answers(Path(r.folder) / ANSWERS_FILE, benchmark) for r in runs)
    if ref.keys() != other.keys():
        raise EvalRunError(f"{other_folder} did not answer the questions of {reference_folder}")
    same = sum(ref[k].strip().lower() == other[k].strip().lower() for k in ref)
    verdict = sum(runs[0].score.correct[k] == runs[1].score.correct[k] for k in ref)
    return {"same_answer": same / len(ref), "same_verdict": verdict / len(ref)}
