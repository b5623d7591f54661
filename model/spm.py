"""The LLaMA SentencePiece vocabulary, without the sentencepiece package.

* ``tokenizer.model`` (the file MobileLLaMA and LLaMA ship) is read and written through the protobuf
  schema transformers carries (``sentencepiece_model_pb2_new``): pieces, scores and types, the
  ``add_dummy_prefix`` flag.
* a GGUF's ``tokenizer.ggml.*`` vocabulary is read back (llama.cpp's test vocabularies are GGUFs).
* ``backend_from_pieces`` builds the ``tokenizers`` BPE that splits as SentencePiece BPE does, with
  the structure of LLaMA-2's ``tokenizer.json``: the normalizer prepends ``▁`` and turns every space
  into ``▁`` (no pre-tokenizer, so pieces may span spaces), merges are ranked by the merged piece's
  score, unknown characters fall back to bytes. With it, text splits into the ids llama.cpp's own
  tokenizer test cases list for the LLaMA vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE

# SentencePiece piece types; llama.cpp's token types use the same numbers (llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "▁"
BOS = "<s>"


class VocabFileError(ValueError):
    """A ``tokenizer.model`` or GGUF vocabulary that cannot be read as a LLaMA SentencePiece vocabulary."""


@dataclass(frozen=True)
class Pieces:
    """A SentencePiece vocabulary: one entry per id."""

    tokens: list[str]
    """Piece text by id (``▁`` for a space, ``<0xNN>`` for a byte-fallback piece)."""
    scores: list[float]
    """Piece scores; in BPE models the higher score merges first."""
    types: list[int]
    """Piece types (``NORMAL`` ... ``BYTE``, the same numbers as llama.cpp's token types)."""
    add_dummy_prefix: bool = True
    """Whether ``▁`` is prepended to the text (SentencePiece's ``add_dummy_prefix``)."""

    def __post_init__(self) -> None:
        if not len(self.tokens) == len(self.scores) == len(self.types):
            raise VocabFileError(
                f"vocabulary has {len(self.tokens)} tokens, {len(self.scores)} scores and "
                f"{len(self.types)} types; they must be one per id"
            )

    def id_of(self, piece: str, default: int) -> int:
        """The id of ``piece``, or ``default`` when the vocabulary lacks it."""
        return self.tokens.index(piece) if piece in self.tokens else default


def _model_proto() -> type:
    from transformers.utils import sentencepiece_model_pb2_new as pb2

    return pb2.ModelProto


def read_tokenizer_model(path: str | Path) -> Pieces:
    """The pieces of a SentencePiece ``tokenizer.model``."""
    proto = _model_proto()()
    try:
        proto.ParseFromString(Path(path).read_bytes())
    except Exception as err:  # protobuf's DecodeError, or a truncated file
        raise VocabFileError(f"{path}: not a SentencePiece model file ({type(err).__name__})") from err
    if not proto.pieces:
        raise VocabFileError(f"{path}: a SentencePiece model file with no pieces")
    return Pieces(
        tokens=[p.piece for p in proto.pieces],
        scores=[float(p.score) for p in proto.pieces],
        types=[int(p.type) for p in proto.pieces],
        add_dummy_prefix=proto.normalizer_spec.add_dummy_prefix,
    )


def write_tokenizer_model(pieces: Pieces, path: str | Path) -> Path:
    """Write ``pieces`` as a SentencePiece BPE ``tokenizer.model`` (LLaMA's trainer settings)."""
    proto = _model_proto()()
    for token, score, kind in zip(pieces.tokens, pieces.scores, pieces.types, strict=True):
        proto.pieces.add(piece=token, score=score, type=kind)
    spec = proto.trainer_spec
    spec.model_type = 2  # BPE
    spec.vocab_size = len(pieces.tokens)
    spec.byte_fallback = BYTE in pieces.types
    spec.split_digits = True
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = (
        pieces.id_of("<unk>", 0), pieces.id_of("<s>", 1), pieces.id_of("</s>", 2), -1,
    )  # fmt: skip
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = pieces.add_dummy_prefix
    proto.normalizer_spec.remove_extra_whitespaces = False
    out = Path(path)
    out.write_bytes(proto.SerializeToString())
    return out


def read_gguf_pieces(path: str | Path) -> Pieces:
    """The ``tokenizer.ggml.*`` vocabulary of a GGUF (tokens, scores, token types, space prefix)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as err:
        raise VocabFileError(f"{path}: not a GGUF file ({type(err).__name__}: {err})") from err

    def values(key: str) -> list:
        field = reader.fields.get(key)
        if field is None:
            raise VocabFileError(f"{path}: no {key} (a GGUF without a vocabulary)")
        return [field.parts[i] for i in field.data]

    prefix = reader.fields.get("tokenizer.ggml.add_space_prefix")
    return Pieces(
        tokens=[bytes(part).decode("utf-8") for part in values("tokenizer.ggml.tokens")],
        scores=[float(part[0]) for part in values("tokenizer.ggml.scores")],
        types=[int(part[0]) for part in values("tokenizer.ggml.token_type")],
        add_dummy_prefix=bool(prefix.parts[prefix.data[0]][0]) if prefix else True,
    )


def merges_from_scores(pieces: Pieces) -> list[tuple[str, str]]:
    """BPE merges that rebuild every mergeable piece, ranked as SentencePiece merges: the merged
    piece's score, highest first (then its id); a piece with several splits gets one merge per split,
    ordered by the ids of the halves."""
    ids = {token: i for i, token in enumerate(pieces.tokens)}
    ranked = []
    for i, (token, score, kind) in enumerate(zip(pieces.tokens, pieces.scores, pieces.types, strict=True)):
        if kind not in (NORMAL, USER_DEFINED) or len(token) < 2:
            continue
        splits = [
            (token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in ids and token[k:] in ids
        ]
        for left, right in sorted(splits, key=lambda s: (ids[s[0]], ids[s[1]])):
            ranked.append((-score, i, ids[left], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def backend_from_pieces(pieces: Pieces) -> Tokenizer:
    """The ``tokenizers`` BPE that tokenizes as SentencePiece with these pieces (LLaMA-2's layout)."""
    unk = pieces.tokens[pieces.types.index(UNKNOWN)] if UNKNOWN in pieces.types else "<unk>"
    vocab = {token: i for i, token in enumerate(pieces.tokens)}
    if len(vocab) != len(pieces.tokens):
        raise VocabFileError(f"vocabulary has {len(pieces.tokens) - len(vocab)} duplicate pieces")
    model = BPE(
        vocab=vocab, merges=merges_from_scores(pieces), unk_token=unk, fuse_unk=True, byte_fallback=True
    )
    tok = Tokenizer(model)
    steps = [normalizers.Prepend(SPACE)] if pieces.add_dummy_prefix else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPACE)])
    tok.decoder = llama_decoder()
    specials = [t for t, kind in zip(pieces.tokens, pieces.types, strict=True) if kind in (CONTROL, UNKNOWN)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if BOS in vocab:
        tok.post_processor = bos_post_processor(vocab[BOS])
    return tok


def llama_decoder() -> decoders.Sequence:
    """The decoder used by the Hugging Face LLaMA tokenizer.json."""
    return decoders.Sequence(
        [
            decoders.Replace(SPACE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )


def bos_post_processor(bos_id: int) -> processors.TemplateProcessing:
    """``<s>`` before each sequence when special tokens are added (LLaMA: bos, no eos)."""
    return processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0",
        pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
        special_tokens=[(BOS, bos_id)],
    )
