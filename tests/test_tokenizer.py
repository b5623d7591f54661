"""Tests for model.tokenizer: the tiny LLaMA-style BPE tokenizer."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from model.tokenizer import BYTE_TOKENS, load_tokenizer, tokenizer_hash, train_tokenizer

TINY_VOCAB_SIZE = 512  # the vocab size of the tiny_tokenizer fixture (tests/conftest.py)
ROUND_TRIP_TEXTS = [
    "A red fox in the snow.",
    "héllo wörld, ça va? Ünïcödé",
    "emoji 😀🦊👍🏽 and flags 🇫🇷",
    "中文字符 日本語 한국어 العربية",
    "tabs\tand\nnewlines\n\nand  double  spaces ",
    "punctuation , spaced . like ( this ) !",
    "zero\u200bwidth and \x00 nul and \U0001f9ea test tube",
]


def test_special_token_ids(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    tok = tiny_tokenizer
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.pad_token == "<unk>"
    assert tok.pad_token_id == 0
    assert tok.convert_ids_to_tokens(list(range(3, 259))) == list(BYTE_TOKENS)
    assert set(tok.all_special_tokens) >= {"<unk>", "<s>", "</s>"}


def test_vocab_size_is_exact(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    assert len(tiny_tokenizer) == TINY_VOCAB_SIZE
    assert tiny_tokenizer.vocab_size == TINY_VOCAB_SIZE
    assert sorted(tiny_tokenizer.get_vocab().values()) == list(range(TINY_VOCAB_SIZE))


def test_llama_structure(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    spec = json.loads(tiny_tokenizer.backend_tokenizer.to_str())
    assert spec["model"]["type"] == "BPE"
    assert spec["model"]["byte_fallback"] is True
    assert spec["model"]["fuse_unk"] is True
    assert spec["model"]["unk_token"] == "<unk>"
    assert spec["pre_tokenizer"]["type"] == "Metaspace"
    assert spec["pre_tokenizer"]["prepend_scheme"] == "first"
    assert [d["type"] for d in spec["decoder"]["decoders"]] == ["Replace", "ByteFallback", "Fuse", "Strip"]
    assert all(t["special"] for t in spec["added_tokens"])


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip_with_byte_fallback(tiny_tokenizer: PreTrainedTokenizerFast, text: str) -> None:
    ids = tiny_tokenizer(text, add_special_tokens=False).input_ids
    assert tiny_tokenizer.unk_token_id not in ids
    assert tiny_tokenizer.decode(ids) == text
    with_bos = tiny_tokenizer(text).input_ids
    assert with_bos == [tiny_tokenizer.bos_token_id, *ids]
    assert tiny_tokenizer.decode(with_bos, skip_special_tokens=True) == text


def test_unseen_characters_use_byte_tokens(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    tokens = tiny_tokenizer.tokenize("🦊")
    assert tokens[-4:] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x8A>"]


def test_bos_only_post_processor(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    ids = tiny_tokenizer("A red fox").input_ids
    assert ids[0] == tiny_tokenizer.bos_token_id
    assert tiny_tokenizer.eos_token_id not in ids
    assert tiny_tokenizer.bos_token_id not in tiny_tokenizer("A red fox", add_special_tokens=False).input_ids


def test_special_token_text_maps_to_special_ids(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    ids = tiny_tokenizer("It is red.</s>USER: hi", add_special_tokens=False).input_ids
    assert ids.count(tiny_tokenizer.eos_token_id) == 1
    assert tiny_tokenizer("</s>", add_special_tokens=False).input_ids == [tiny_tokenizer.eos_token_id]
    assert tiny_tokenizer("<s>", add_special_tokens=False).input_ids == [tiny_tokenizer.bos_token_id]
    assert tiny_tokenizer.decode(ids) == "It is red.</s>USER: hi"


def test_save_load_and_hash_are_stable(tiny_tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    digest = tokenizer_hash(tiny_tokenizer)
    assert len(digest) == 64
    tiny_tokenizer.save_pretrained(str(tmp_path / "a"))
    loaded = load_tokenizer(tmp_path / "a")
    assert tokenizer_hash(tmp_path / "a") == digest
    assert tokenizer_hash(tmp_path / "a" / "tokenizer.json") == digest
    assert tokenizer_hash(loaded) == digest
    loaded.save_pretrained(str(tmp_path / "b"))
    assert tokenizer_hash(str(tmp_path / "b")) == digest
    text = "A white cat 😀 </s> near a river"
    assert loaded(text).input_ids == tiny_tokenizer(text).input_ids
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (1, 2, 0)
    assert loaded.model_max_length == tiny_tokenizer.model_max_length


def test_hash_ignores_runtime_truncation(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    digest = tokenizer_hash(tiny_tokenizer)
    tiny_tokenizer.backend_tokenizer.enable_truncation(max_length=8)
    try:
        assert tokenizer_hash(tiny_tokenizer) == digest
    finally:
        tiny_tokenizer.backend_tokenizer.no_truncation()


def test_training_is_deterministic_and_corpus_sensitive(tiny_corpus: list[str]) -> None:
    corpus = list(tiny_corpus)
    first = tokenizer_hash(train_tokenizer(corpus, vocab_size=400))
    assert tokenizer_hash(train_tokenizer(corpus, vocab_size=400)) == first
    assert tokenizer_hash(train_tokenizer([*corpus, "zebras quickly jumped"] * 2, vocab_size=400)) != first
    assert tokenizer_hash(train_tokenizer(corpus, vocab_size=401)) != first


def test_out_dir_and_model_max_length(tiny_corpus: list[str], tmp_path: Path) -> None:
    tok = train_tokenizer(tiny_corpus, vocab_size=300, out_dir=tmp_path / "tok", model_max_length=128)
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    assert tok.model_max_length == 128
    assert load_tokenizer(str(tmp_path / "tok")).model_max_length == 128


def test_small_corpus_gives_smaller_vocab(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="model.tokenizer"):
        tok = train_tokenizer(["ab ab ab"], vocab_size=1000)
    assert 259 < len(tok) < 1000
    assert "corpus only supports" in caplog.text
    assert tok.decode(tok("ab 😀").input_ids, skip_special_tokens=True) == "ab 😀"


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size=259 is too small"):
        train_tokenizer(["hello"], vocab_size=259)
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json"):
        tokenizer_hash(tmp_path)
