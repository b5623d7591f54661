"""Tiny LLaMA-style tokenizer: training, loading and content hashing.

The tokenizer mirrors the structure of the Hugging Face ``tokenizer.json`` of LLaMA / Vicuna /
MobileLLaMA (SentencePiece BPE with byte fallback), so that code written against the real
tokenizer behaves the same on the tiny CPU profile:

* ids 0, 1, 2 are ``<unk>``, ``<s>``, ``</s>`` (registered special tokens);
* ids 3..258 are the byte-fallback tokens ``<0x00>`` .. ``<0xFF>``;
* the remaining ids are learned BPE tokens in merge order;
* Metaspace pre-tokenisation (``"▁"``, prepend scheme ``"first"``), no normaliser; ``split=True`` so
  learned pieces never span words (as SentencePiece's ``split_by_whitespace``; LLaMA's file says
  ``split=False``, which gives the same pieces for merges learned this way);
* decoder ``Replace("▁", " ") -> ByteFallback -> Fuse -> Strip(" ", 1, 0)``;
* ``<s>`` is prepended when ``add_special_tokens=True`` (bos only, no eos);
* the pad token is ``<unk>`` (id 0), the usual LLaMA fine-tuning convention.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from model.spm import bos_post_processor, llama_decoder

logger = logging.getLogger(__name__)

UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
SPECIAL_TOKENS: tuple[str, ...] = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN)
BYTE_TOKENS: tuple[str, ...] = tuple(f"<0x{i:02X}>" for i in range(256))
METASPACE = "▁"
NUM_RESERVED = len(SPECIAL_TOKENS) + len(BYTE_TOKENS)  # 259
DEFAULT_MODEL_MAX_LENGTH = 2048
TOKENIZER_FILES: tuple[str, ...] = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
SENTENCEPIECE_FILE = "tokenizer.model"
# Runtime state that transformers toggles on the backend tokenizer; not part of the tokenizer's identity.
_VOLATILE_JSON_KEYS = ("truncation", "padding")


def _metaspace() -> pre_tokenizers.Metaspace:
    """The LLaMA-style Metaspace pre-tokenizer (``▁`` replaces spaces, prepended to the first word)."""
    return pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="first", split=True)


def _learn_bpe(texts: Iterable[str], num_learned: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Train a plain BPE on ``texts``; return its tokens (in id order) and merges (in rank order)."""
    trainer_tok = Tokenizer(BPE())
    trainer_tok.pre_tokenizer = _metaspace()
    trainer = BpeTrainer(
        vocab_size=num_learned,
        show_progress=False,
        special_tokens=[],
        limit_alphabet=max(1, min(1000, num_learned // 2)),
    )
    trainer_tok.train_from_iterator(texts, trainer=trainer)
    model_json = json.loads(trainer_tok.to_str())["model"]
    tokens = [tok for tok, _ in sorted(model_json["vocab"].items(), key=lambda kv: kv[1])]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in model_json["merges"]]
    return tokens, merges


def _build_vocab(learned: list[str]) -> dict[str, int]:
    """Specials, then bytes, then the learned tokens with shifted ids (duplicates of reserved skipped)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + BYTE_TOKENS)}
    for tok in learned:
        if tok in vocab:
            logger.warning("learned token %r collides with a reserved token; keeping the reserved id", tok)
            continue
        vocab[tok] = len(vocab)
    return vocab


def build_backend(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    """Assemble the LLaMA-structured ``tokenizers.Tokenizer`` from a vocabulary and merges."""
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=UNK_TOKEN, fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = _metaspace()
    tok.decoder = llama_decoder()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.post_processor = bos_post_processor(vocab[BOS_TOKEN])
    return tok


def wrap_backend(
    backend: Tokenizer, model_max_length: int = DEFAULT_MODEL_MAX_LENGTH
) -> PreTrainedTokenizerFast:
    """Wrap a backend tokenizer in a transformers fast tokenizer with LLaMA special-token settings."""
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=UNK_TOKEN,
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: Path | None = None,
    model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
) -> PreTrainedTokenizerFast:
    """Train a tiny LLaMA-style SentencePiece-BPE tokenizer (byte fallback) on ``texts``.

    The vocabulary holds exactly ``vocab_size`` tokens when the corpus supports that many merges;
    a small corpus yields fewer (a warning is logged; nothing is padded). The result is saved with
    ``save_pretrained(out_dir)`` when ``out_dir`` is given.
    """
    if vocab_size <= NUM_RESERVED:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: {NUM_RESERVED} ids are reserved for "
            f"{len(SPECIAL_TOKENS)} special tokens and 256 byte tokens; use vocab_size > {NUM_RESERVED}"
        )
    learned, merges = _learn_bpe(texts, vocab_size - NUM_RESERVED)
    vocab = _build_vocab(learned)
    if len(vocab) < vocab_size:
        logger.warning("corpus only supports %d tokens (requested vocab_size=%d)", len(vocab), vocab_size)
    tokenizer = wrap_backend(build_backend(vocab, merges), model_max_length=model_max_length)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(str(out_dir))
        logger.debug("saved tokenizer (vocab %d) to %s", len(tokenizer), out_dir)
    return tokenizer


def _canonical_json(tokenizer_json: dict) -> str:
    """Canonical JSON text of a tokenizer.json dict (sorted keys, runtime state dropped)."""
    content = {k: v for k, v in tokenizer_json.items() if k not in _VOLATILE_JSON_KEYS}
    return json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def tokenizer_hash(tok_or_dir: PreTrainedTokenizerFast | Tokenizer | str | Path) -> str:
    """SHA-256 (hex) of the canonical ``tokenizer.json`` content of a tokenizer or a saved directory.

    Stable across save/load; truncation and padding settings (runtime state) are excluded.
    """
    if isinstance(tok_or_dir, PreTrainedTokenizerFast):
        tokenizer_json = json.loads(tok_or_dir.backend_tokenizer.to_str())
    elif isinstance(tok_or_dir, Tokenizer):
        tokenizer_json = json.loads(tok_or_dir.to_str())
    else:
        path = Path(tok_or_dir)
        path = path / "tokenizer.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(
                f"no tokenizer.json at {path}; pass a tokenizer or a save_pretrained directory"
            )
        tokenizer_json = json.loads(path.read_text(encoding="utf-8"))
    return hashlib.sha256(_canonical_json(tokenizer_json).encode("utf-8")).hexdigest()


def _resolve_location(path_or_id: str | Path) -> str:
    """A local directory (checked for tokenizer files, failing fast without a hub lookup) or a hub id."""
    text = str(path_or_id)
    if not (isinstance(path_or_id, Path) or Path(text).exists() or text.startswith(("/", ".", "~"))):
        return text  # a hub id such as "mtgv/MobileLLaMA-1.4B-Base"
    directory = Path(text).expanduser()
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {text!r}; create them with "
            "train_tokenizer(..., out_dir=...) or tokenizer.save_pretrained(dir), "
            "or pass a hub id such as 'mtgv/MobileLLaMA-1.4B-Base'"
        )
    return str(directory)


def load_tokenizer(path_or_id: str | Path) -> PreTrainedTokenizerFast:
    """Load a fast tokenizer from a local directory or a hub id (``AutoTokenizer.from_pretrained``)."""
    location = _resolve_location(path_or_id)
    sentencepiece = Path(location) / SENTENCEPIECE_FILE
    if not (Path(location) / "tokenizer.json").is_file() and sentencepiece.is_file():
        return _from_sentencepiece(sentencepiece)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"could not load a tokenizer from {location!r}: {err}. Pass a directory written by "
            "train_tokenizer(..., out_dir=...) / save_pretrained, or a hub id available in the local cache."
        ) from err
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise TypeError(
            f"{location!r} loaded a slow tokenizer ({type(tokenizer).__name__}); a fast tokenizer is needed"
        )
    return tokenizer


def _from_sentencepiece(path: Path) -> PreTrainedTokenizerFast:
    """The fast tokenizer of a folder that ships only SentencePiece's ``tokenizer.model`` (the layout
    of the released MobileLLaMA and LLaMA models), built without the sentencepiece package."""
    from model.spm import VocabFileError, backend_from_pieces, read_tokenizer_model

    try:
        tokenizer = wrap_backend(backend_from_pieces(read_tokenizer_model(path)))
    except VocabFileError as err:
        raise FileNotFoundError(f"could not load a tokenizer from {path}: {err}") from err
    tokenizer.name_or_path = str(path.parent)
    return tokenizer


def save_tokenizer(tokenizer: Any, folder: str | Path) -> None:
    """``save_pretrained`` into ``folder``, keeping the SentencePiece ``tokenizer.model`` of the folder
    the tokenizer was loaded from (its scores are what a GGUF export writes)."""
    tokenizer.save_pretrained(str(folder))
    loaded_from = getattr(tokenizer, "name_or_path", "") or ""
    source, target = Path(loaded_from) / SENTENCEPIECE_FILE, Path(folder) / SENTENCEPIECE_FILE
    if loaded_from and source.is_file() and not target.exists():
        shutil.copyfile(source, target)
