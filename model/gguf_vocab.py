"""The vocabulary a LLaMA GGUF carries (``tokenizer.ggml.*``), from a checkpoint's tokenizer files.

llama.cpp's ``llama`` tokenizer is SentencePiece BPE: it merges the adjacent pair whose merged piece
has the highest score, and prepends ``▁`` when ``add_space_prefix`` is set. A checkpoint with
SentencePiece's ``tokenizer.model`` (the released MobileLLaMA, or ours trained from it) gives the
real scores and piece types, as ``convert_hf_to_gguf`` writes them. A checkpoint with only
``tokenizer.json`` (a tokenizer trained here) has no scores: each merged piece then scores minus
the rank of its first merge, which orders llama.cpp's merges as the BPE merges of tokenizer.json.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from model.spm import BYTE, CONTROL, NORMAL, SPACE, UNKNOWN, UNUSED, read_tokenizer_model

_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


class GGUFExportError(ValueError):
    """A model or tokenizer that cannot be written as the GGUF llama.cpp expects."""


@dataclass(frozen=True)
class Vocab:
    """A SentencePiece-style vocabulary as llama.cpp's ``llama`` tokenizer reads it."""

    tokens: list[str]
    """Token text by id (``▁`` for spaces, ``<0xNN>`` for byte fallback)."""
    scores: list[float]
    """Merge priority: the higher merges first (SentencePiece's scores, or minus the merge rank)."""
    types: list[int]
    """llama.cpp token types (normal, unknown, control, unused, byte)."""
    bos_id: int
    """Begin-of-sequence id."""
    eos_id: int
    """End-of-sequence id."""
    unk_id: int
    """Unknown-token id (also the pad id, the LLaMA fine-tuning convention)."""
    add_space_prefix: bool
    """Whether ``▁`` is prepended to the text."""


def checkpoint_vocab(checkpoint: Path, vocab_size: int) -> Vocab:
    """The vocabulary of a checkpoint folder: ``tokenizer.model``'s when there is one (checked against
    ``tokenizer.json``, which is what the model was trained with), else ``tokenizer.json``'s."""
    data = None
    if (checkpoint / "tokenizer.json").is_file():
        data = json.loads((checkpoint / "tokenizer.json").read_text(encoding="utf-8"))
    if (checkpoint / "tokenizer.model").is_file():
        return vocab_from_sentencepiece(checkpoint / "tokenizer.model", vocab_size, data)
    if data is None:
        raise GGUFExportError(
            f"{checkpoint}: no tokenizer.json or tokenizer.model to write the vocabulary from"
        )
    return vocab_from_tokenizer_json(data, vocab_size)


def vocab_from_sentencepiece(path: Path, vocab_size: int, tokenizer_json: dict[str, Any] | None) -> Vocab:
    """The vocabulary of SentencePiece's ``tokenizer.model``: real scores and piece types."""
    pieces = read_tokenizer_model(path)
    _check_size(len(pieces.tokens), vocab_size)
    if tokenizer_json is not None:
        trained = _tokens_by_id(tokenizer_json)
        if stray := [i for i, t in trained.items() if i >= len(pieces.tokens) or pieces.tokens[i] != t][:3]:
            raise GGUFExportError(
                f"{path} and tokenizer.json beside it disagree (ids {stray}: "
                f"{[trained[i] for i in stray]} in tokenizer.json); remove the stale tokenizer.model "
                "or save the checkpoint with the tokenizer it was trained with"
            )
    tokens, scores, types = list(pieces.tokens), list(pieces.scores), list(pieces.types)
    for i in range(len(tokens), vocab_size):  # a model padded beyond the tokenizer
        tokens.append(f"[PAD{i}]")
        scores.append(0.0)
        types.append(UNUSED)
    return Vocab(
        tokens, scores, types, pieces.id_of("<s>", 1), pieces.id_of("</s>", 2),
        pieces.id_of("<unk>", 0), pieces.add_dummy_prefix,
    )  # fmt: skip


def _tokens_by_id(data: dict[str, Any]) -> dict[int, str]:
    by_id = {i: t for t, i in data["model"]["vocab"].items()}
    by_id.update({t["id"]: t["content"] for t in data.get("added_tokens", [])})
    return by_id


def _check_size(tokens: int, vocab_size: int) -> None:
    if tokens > vocab_size:
        raise GGUFExportError(
            f"tokenizer has {tokens} tokens but the model's vocab_size is {vocab_size}; "
            "rebuild the model with vocab_size=len(tokenizer)"
        )


def vocab_from_tokenizer_json(data: dict[str, Any], vocab_size: int) -> Vocab:
    """Build the GGUF vocabulary from a Hugging Face ``tokenizer.json`` (BPE with byte fallback)."""
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise GGUFExportError(
            "tokenizer.json must hold a LLaMA-style BPE model with byte_fallback "
            f"(got type={model.get('type')!r}, byte_fallback={model.get('byte_fallback')!r})"
        )
    by_id = _tokens_by_id(data)
    special = {t["id"] for t in data.get("added_tokens", [])}
    _check_size(len(by_id), vocab_size)
    ranks = _merge_ranks(model.get("merges") or [])
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        text = by_id.get(i, f"[PAD{i}]")
        tokens.append(text)
        types.append(_token_type(text, i in special, i in by_id))
        scores.append(0.0 if types[-1] != NORMAL else -float(ranks.get(text, len(ranks) + i)))
    ids = {t: i for i, t in by_id.items()}
    return Vocab(
        tokens=tokens,
        scores=scores,
        types=types,
        bos_id=ids.get("<s>", 1),
        eos_id=ids.get("</s>", 2),
        unk_id=ids.get("<unk>", 0),
        add_space_prefix=_prepends_space(data.get("pre_tokenizer"))
        or _prepends_space(data.get("normalizer")),
    )


def _merge_ranks(merges: list) -> dict[str, int]:
    """Each merged piece's rank: the rank of the first merge that makes it."""
    ranks: dict[str, int] = {}
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        ranks.setdefault(left + right, rank)
    return ranks


def _token_type(text: str, special: bool, known: bool) -> int:
    if not known:
        return UNUSED
    if text == "<unk>":
        return UNKNOWN
    if special:
        return CONTROL
    return BYTE if _BYTE_TOKEN.match(text) else NORMAL


def _prepends_space(step: dict[str, Any] | None) -> bool:
    """True when a Metaspace pre-tokenizer or a Prepend("▁") normalizer (possibly inside a Sequence)
    prepends ``▁``."""
    if not step:
        return False
    if step.get("type") == "Sequence":
        return any(_prepends_space(p) for p in step.get("pretokenizers", step.get("normalizers", [])))
    if step.get("type") == "Prepend":
        return step.get("prepend") == SPACE
    return step.get("type") == "Metaspace" and step.get("prepend_scheme", "always") in ("always", "first")


def add_vocab(writer: gguf.GGUFWriter, vocab: Vocab) -> None:
    """Write the ``tokenizer.ggml.*`` keys."""
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    writer.add_bos_token_id(vocab.bos_id)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_unk_token_id(vocab.unk_id)
    writer.add_pad_token_id(vocab.unk_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(vocab.add_space_prefix)
