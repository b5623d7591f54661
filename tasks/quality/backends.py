"""Two ways to answer benchmark questions with one interface: a PyTorch stage checkpoint (batched
greedy decoding, KV cache) and a GGUF with its mmproj through llama.cpp's multimodal library.

Both render the same prompt (the recipe's conversation template around the question, ``<image>``
first where there is an image), tokenise the text with the checkpoint's tokenizer and decode
greedily up to the set's answer length, stopping at the end of the answer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)


class Answerer(Protocol):
    """Answers questions; ``images[i]`` is a PIL image or None for a text-only question."""

    name: str
    """What answers: ``pytorch`` or ``llama.cpp/<quant type>``."""

    def answer(self, questions: Sequence[str], images: Sequence[Any], max_new_tokens: int) -> list[str]:
        """The greedy answer to each question, in order."""
        ...

    def close(self) -> None:
        """Free the model."""
        ...


@dataclass
class TorchAnswerer:
    """A stage checkpoint answered with PyTorch, in batches of questions."""

    checkpoint: Path
    """The stage's final checkpoint folder (config, weights, tokenizer)."""
    template: str = "v1"
    """Conversation template of the recipe's instruction stage."""
    batch: int = 16
    """Questions decoded together (left-padded)."""
    name: str = "pytorch"
    """Shown in tables and MLflow run names."""

    def __post_init__(self) -> None:
        import torch

        import model as mvlm
        from model.tokenizer import load_tokenizer

        torch.manual_seed(0)
        self.vlm = mvlm.load(self.checkpoint)
        self.tokenizer = load_tokenizer(self.checkpoint)

    def answer(self, questions: Sequence[str], images: Sequence[Any], max_new_tokens: int) -> list[str]:
        """Greedy answers, batched by whether a question has an image."""
        from model.answering import greedy_answers
        from model.conversation import build_prompt

        prompts = [
            build_prompt(q, self.template, img is not None) for q, img in zip(questions, images, strict=True)
        ]
        return greedy_answers(self.vlm, self.tokenizer, prompts, images, max_new_tokens, self.batch)

    def close(self) -> None:
        """Drop the model."""
        self.vlm = None


@dataclass
class LlamaCppAnswerer:
    """A GGUF language model with its mmproj answered through llama.cpp, one question at a time."""

    gguf: Path
    """The (quantized) language-model GGUF."""
    mmproj: Path | None
    """The vision tower + projector GGUF (None: text-only questions only)."""
    tokenizer_dir: Path
    """The checkpoint whose tokenizer renders prompts and decodes answers (the GGUF carries the same
    vocabulary; tokenising with ours keeps the prompt ids identical to the PyTorch path)."""
    template: str = "v1"
    """Conversation template of the recipe's instruction stage."""
    threads: int = 2
    """llama.cpp CPU threads."""
    name: str = "llama.cpp"
    """Shown in tables and MLflow run names (``llama.cpp/<quant type>``)."""

    def __post_init__(self) -> None:
        from model.tokenizer import load_tokenizer
        from tasks.ship.llama_cpp import LlamaCpp, RuntimeOptions

        self.tokenizer = load_tokenizer(self.tokenizer_dir)
        self.runtime = LlamaCpp(self.gguf, RuntimeOptions(n_ctx=2048, threads=self.threads), self.mmproj)

    def answer(self, questions: Sequence[str], images: Sequence[Any], max_new_tokens: int) -> list[str]:
        """Greedy answers, each from a fresh KV cache."""
        return [self._one(q, img, max_new_tokens) for q, img in zip(questions, images, strict=True)]

    def _one(self, question: str, image: Any, max_new_tokens: int) -> str:
        from model.conversation import IMAGE_TOKEN_INDEX, build_prompt, tokenize_prompt

        ids = tokenize_prompt(build_prompt(question, self.template, image is not None), self.tokenizer)
        self.runtime.reset()
        if image is None:
            self.runtime.decode(ids)
        else:
            at = ids.index(IMAGE_TOKEN_INDEX)
            self.runtime.eval_segments([ids[:at], image, ids[at + 1 :]])
        tokens = self.runtime.greedy(max_new_tokens)
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    def close(self) -> None:
        """Free llama.cpp's model and contexts."""
        self.runtime.close()


@dataclass(frozen=True)
class ModelRef:
    """A model to evaluate, resolved from a path: what answers and what identifies it."""

    path: Path
    """A checkpoint folder, or a GGUF written by ``mvlm export`` / ``mvlm quantize``."""
    identity: str
    """Checkpoint fingerprint hash, or the export / quant id of the GGUF."""
    backend: str
    """``pytorch`` or ``llama.cpp/<type>`` (``f16``/``f32`` for an unquantized export)."""
    mmproj: Path | None = None
    """The GGUF's mmproj (from its manifest)."""
    checkpoint: Path | None = None
    """The checkpoint the model came from (its tokenizer renders prompts)."""


class ModelRefError(ValueError):
    """A path that is not a checkpoint or a GGUF of ours."""


def resolve_model(path: str | Path) -> ModelRef:
    """What ``path`` is: a checkpoint folder (config.json) or a GGUF whose manifest names its mmproj
    and, through its export, the checkpoint; ModelRefError says what to pass otherwise."""
    from tasks.core.identity import hash_json, read_json
    from tasks.ship.export import MANIFEST, checkpoint_fingerprint

    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        return ModelRef(path, hash_json(checkpoint_fingerprint(path)), "pytorch", checkpoint=path)
    manifest_path = path.parent / MANIFEST
    if path.suffix != ".gguf" or not path.is_file() or not manifest_path.is_file():
        raise ModelRefError(
            f"{path}: pass a checkpoint folder (with config.json) or a model GGUF inside a folder written by "
            "`mvlm export` or `mvlm quantize` (its manifest.json names the mmproj and the checkpoint)"
        )
    manifest = read_json(manifest_path)
    export = manifest
    if manifest.get("kind") == "quant":
        export = read_json(Path(manifest["inputs"]["source_path"]).parent / MANIFEST)
    kind = manifest.get("quant_type") or manifest.get("config", {}).get("llm_dtype", "f16")
    mmproj = path.parent / manifest["mmproj"] if manifest.get("mmproj") else None
    checkpoint = Path(export["inputs"]["checkpoint"])
    if not (checkpoint / "config.json").is_file():
        raise ModelRefError(
            f"{path}: the checkpoint it was exported from ({checkpoint}) is not here; its tokenizer renders "
            "the prompts: copy that folder back or evaluate on the machine that has it"
        )
    return ModelRef(path, manifest["id"], f"llama.cpp/{kind}", mmproj, checkpoint)


def open_answerer(ref: ModelRef, template: str = "v1", threads: int = 2, batch: int = 16) -> Answerer:
    """The answerer of a resolved model."""
    if ref.backend == "pytorch":
        return TorchAnswerer(ref.path, template, batch)
    return LlamaCppAnswerer(ref.path, ref.mmproj, ref.checkpoint or ref.path, template, threads, ref.backend)
