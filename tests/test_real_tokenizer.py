"""The real LLaMA SentencePiece vocabulary (32,000 pieces, fetched from llama-cpp-python's sdist on the
package registry): our tokenizer splits llama.cpp's own test texts into its listed ids; a released-style
folder (``tokenizer.model`` only) loads and its file survives a checkpoint save; our GGUF export
carries the real scores and types, and llama.cpp tokenizes the test texts with it to the same ids.
A tokenizer.json-only checkpoint exports scores ordered as its merges, which llama.cpp splits alike."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from model.spm import BYTE, CONTROL, NORMAL, UNKNOWN, read_gguf_pieces, read_tokenizer_model
from model.tokenizer import load_tokenizer
from tasks.testkit.llama_cpp_source import LlamaVocab, fetch_llama_vocab, released_tokenizer

pytestmark = pytest.mark.slow  # one registry download per machine (cached), then seconds


@pytest.fixture(scope="module")
def vocab() -> LlamaVocab:
    return fetch_llama_vocab()


@pytest.fixture(scope="module")
def released(vocab: LlamaVocab, tmp_path_factory) -> Path:
    return released_tokenizer(vocab, tmp_path_factory.mktemp("released"))


@pytest.fixture(scope="module")
def checkpoint(released: Path, tmp_path_factory) -> Path:
    """A tiny LLaMA with the real vocabulary, saved with the released tokenizer (as a stage saves)."""
    import model

    module = model.build("tiny-llama", vocab_size=32000)
    return model.save(module, tmp_path_factory.mktemp("ckpt") / "final", tokenizer=load_tokenizer(released))


def test_the_vocabulary_is_llamas(vocab: LlamaVocab) -> None:
    pieces = read_gguf_pieces(vocab.gguf)
    assert len(pieces.tokens) == 32000 and pieces.tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert [pieces.types.count(t) for t in (NORMAL, BYTE, CONTROL, UNKNOWN)] == [31741, 256, 2, 1]
    assert pieces.scores[260] == -1.0 and pieces.scores[29871] == -1e9  # "▁t" merges first, "▁" last
    assert len(vocab.cases()) == 46


def test_our_tokenizer_splits_llama_cpps_test_texts_into_its_ids(vocab: LlamaVocab, released: Path) -> None:
    """llama.cpp's harness: no bos, special tokens not parsed, ``▁`` prepended even before a space."""
    assert sorted(p.name for p in released.iterdir()) == ["tokenizer.model"]
    tok = load_tokenizer(released)
    assert len(tok) == 32000
    wrong = [(text, tok.encode(text, add_special_tokens=False), ids) for text, ids in vocab.cases()]
    assert [w for w in wrong if w[1] != w[2]] == []
    assert tok.encode("Hello world") == [1, 15043, 3186]  # bos added by default
    text = " this is 🦙.cpp"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_tokenizer_model_round_trips_and_a_checkpoint_keeps_it(
    vocab: LlamaVocab, released: Path, checkpoint: Path
) -> None:
    assert read_tokenizer_model(released / "tokenizer.model") == read_gguf_pieces(vocab.gguf)
    assert (checkpoint / "tokenizer.model").read_bytes() == (released / "tokenizer.model").read_bytes()
    assert (checkpoint / "tokenizer.json").is_file()
    tok = load_tokenizer(checkpoint)  # tokenizer.json now: the same splits
    assert all(tok.encode(text, add_special_tokens=False) == ids for text, ids in vocab.cases())


def _llama_cpp_ids(gguf_path: Path, texts: list[str]) -> list[list[int]]:
    import llama_cpp

    llm = llama_cpp.Llama(str(gguf_path), vocab_only=True, verbose=False)
    try:
        return [llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) for text in texts]
    finally:
        llm.close()


def test_the_gguf_carries_the_real_scores_and_llama_cpp_splits_as_we_do(
    vocab: LlamaVocab, checkpoint: Path, tmp_path: Path
) -> None:
    from tasks.ship.export import export_checkpoint

    result = export_checkpoint(checkpoint, tmp_path / "export")
    ours, real = read_gguf_pieces(result.llm), read_gguf_pieces(vocab.gguf)
    assert ours.tokens == real.tokens and ours.types == real.types and ours.scores == real.scores
    assert ours.add_dummy_prefix
    texts, ids = zip(*vocab.cases(), strict=True)
    by_llama_cpp = _llama_cpp_ids(result.llm, list(texts))
    assert by_llama_cpp == list(ids)
    tok = load_tokenizer(checkpoint)  # the transformers tokenizer the checkpoint trains and evaluates with
    assert by_llama_cpp == [tok.encode(text, add_special_tokens=False) for text in texts]


def test_transformers_own_gguf_loader_differs_on_leading_spaces(vocab: LlamaVocab) -> None:
    """Why we build the tokenizer ourselves: ``from_pretrained(gguf_file=...)`` makes a Metaspace
    pre-tokenizer that does not prepend ``▁`` to a text that starts with a space, as llama.cpp does."""
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(str(vocab.folder), gguf_file=vocab.gguf.name)
    wrong = [text for text, ids in vocab.cases() if theirs.encode(text, add_special_tokens=False) != ids]
    assert wrong and all(text.startswith(" ") for text in wrong)


def test_a_tokenizer_json_checkpoint_exports_merge_ranked_scores_that_split_alike(
    vocab: LlamaVocab, checkpoint: Path, tmp_path: Path
) -> None:
    """Without tokenizer.model the real scores are not known: minus each piece's merge rank keeps
    llama.cpp's merge order, so the ids are the same."""
    from tasks.ship.export import export_checkpoint

    bare = shutil.copytree(checkpoint, tmp_path / "bare")
    (bare / "tokenizer.model").unlink()
    result = export_checkpoint(bare, tmp_path / "export")
    ours, real = read_gguf_pieces(result.llm), read_gguf_pieces(vocab.gguf)
    assert ours.tokens == real.tokens and ours.types == real.types and ours.scores != real.scores
    texts, ids = zip(*vocab.cases(), strict=True)
    assert _llama_cpp_ids(result.llm, list(texts)) == list(ids)


def test_a_stale_tokenizer_model_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    from model.gguf_vocab import GGUFExportError, checkpoint_vocab
    from model.spm import Pieces, write_tokenizer_model

    stale = shutil.copytree(checkpoint, tmp_path / "stale")
    pieces = read_tokenizer_model(stale / "tokenizer.model")
    tokens = list(pieces.tokens)
    tokens[300], tokens[301] = tokens[301], tokens[300]
    write_tokenizer_model(Pieces(tokens, pieces.scores, pieces.types), stale / "tokenizer.model")
    with pytest.raises(
        GGUFExportError, match=r"tokenizer.model and tokenizer.json beside it disagree \(ids \[300, 301\]"
    ):
        checkpoint_vocab(stale, 32000)
