"""Evaluation after a stage: held-out perplexity (text) and exact-match answers (instructions).

Instruction evaluation asks every round of every held-out conversation, with the earlier rounds as
history and the image spliced in, decodes greedily and compares the normalised answer with the
reference. Accuracy is reported overall and per question type when a classifier knows the type.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tasks.data.shard_read import read_tar_samples, text_rows
from tasks.train.loader import Source

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """Scores of one evaluation."""

    kind: str
    """``perplexity`` or ``exact_match``."""
    metrics: dict[str, float]
    """Named scores (``perplexity``; ``accuracy`` and ``accuracy/<type>``)."""
    counts: dict[str, int] = field(default_factory=dict)
    """How many items each score is over."""
    examples: list[dict[str, str]] = field(default_factory=list)
    """A few (question, expected, answer) triples for people to read."""


def _samples(sources: tuple[Source, ...], limit: int) -> list[dict]:
    out: list[dict] = []
    for source in sources:
        for shard in source.shards:
            for sample in read_tar_samples(shard):
                out.append(sample)
                if len(out) >= limit:
                    return out
    return out


@torch.no_grad()
def perplexity(model: Any, sources: tuple[Source, ...], limit: int = 200, batch: int = 8) -> EvalResult:
    """exp(mean token NLL) over held-out packed sequences."""
    model.eval()
    rows = (ids for s in _samples(sources, limit) for ids, _ in text_rows(s))  # a sample packs several
    seqs = [ids.astype(np.int64) for ids in itertools.islice(rows, limit)]
    if not seqs:
        raise ValueError("no held-out text samples to evaluate (is heldout_fraction 0 in the spec?)")
    nll, count = 0.0, 0
    for i in range(0, len(seqs), batch):
        ids = torch.tensor(np.stack(seqs[i : i + batch]))
        logits = model(input_ids=ids).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        nll += float(loss)
        count += ids[:, 1:].numel()
    return EvalResult(
        "perplexity", {"perplexity": math.exp(nll / count), "nll": nll / count}, {"tokens": count}
    )


def normalise_answer(text: str) -> str:
    """Lowercase, first line, no surrounding punctuation or spaces."""
    text = text.strip().splitlines()[0] if text.strip() else ""
    return re.sub(r"^[\W_]+|[\W_]+$", "", text.lower())


def _questions(samples: list[dict]) -> list[tuple[str, str, bytes | None]]:
    from model.conversation import move_image_to_front, prompt_for_round

    out = []
    for sample in samples:
        conv = json.loads(sample["json"])["conversations"]
        image = sample.get("jpg")
        if image is not None:
            conv = move_image_to_front(conv)
        for k in range(len(conv) // 2):
            prompt, answer = prompt_for_round(conv, k)
            out.append((prompt, answer, image))
    return out


@torch.no_grad()
def exact_match(
    model: Any, tokenizer: Any, sources: tuple[Source, ...], limit: int = 200, batch: int = 16,
    max_new_tokens: int = 8, classify: Callable[[str], str | None] | None = None,
) -> EvalResult:  # fmt: skip
    """Greedy answers to held-out instruction rounds scored by exact match."""
    from PIL import Image

    from model.answering import greedy_answers

    questions = _questions(_samples(sources, limit))
    if not questions:
        raise ValueError("no held-out instruction samples to evaluate (is heldout_fraction 0 in the spec?)")
    right, total = Counter(), Counter()
    examples = []
    pictures = [Image.open(io.BytesIO(img)) if img else None for _, _, img in questions]
    got_all = greedy_answers(model, tokenizer, [p for p, _, _ in questions], pictures, max_new_tokens, batch)
    for (prompt, answer, _), text in zip(questions, got_all, strict=True):
        got = normalise_answer(text)
        ok = got == normalise_answer(answer)
        question = prompt.rsplit("USER:", 1)[-1].removesuffix("ASSISTANT:").strip()
        for key in ("all", (classify(question) if classify else None)):
            if key:
                total[key] += 1
                right[key] += ok
        if len(examples) < 12:
            examples.append({"question": question, "expected": answer, "answer": got})
    metrics = {"accuracy": right["all"] / total["all"]}
    metrics |= {f"accuracy/{k}": right[k] / total[k] for k in total if k != "all"}
    return EvalResult("exact_match", metrics, dict(total), examples)


def pattern_classifier(types: dict[str, tuple[str, ...]]) -> Callable[[str], str | None] | None:
    """A question's type: the first type one of whose patterns the question's first line (after
    its image token; later lines are instructions) fully matches, else None; None without types."""
    if not types:
        return None
    compiled = [(kind, re.compile(p)) for kind, patterns in types.items() for p in patterns]

    def classify(text: str) -> str | None:
        question = text.removeprefix("<image>").strip().split("\n", 1)[0]
        return next((kind for kind, pattern in compiled if pattern.fullmatch(question)), None)

    return classify


def evaluate_checkpoint(
    checkpoint: Path, sources: tuple[Source, ...], kind: str, limit: int,
    classify: Callable[[str], str | None] | None = None,
) -> EvalResult:  # fmt: skip
    """Load a stage's final checkpoint and run the evaluation that fits its data; ``classify`` names
    a question's type for per-type accuracies (None for a question of no known type)."""
    import model as mvlm
    from model.tokenizer import load_tokenizer

    torch.manual_seed(0)
    vlm = mvlm.load(checkpoint)
    if kind == "text":
        return perplexity(vlm, sources, limit)
    tokenizer = load_tokenizer(checkpoint)
    return exact_match(vlm, tokenizer, sources, limit=limit, classify=classify)


def write_result(result: EvalResult, path: Path) -> Path:
    """The result as JSON next to the stage."""

    from tasks.core.identity import atomic_write_json

    return atomic_write_json(path, asdict(result))
