"""Signatures for near-duplicate search: MinHash of a text's word n-grams, perceptual hash of an image.

MinHash is rensa's ``RMinHash`` (Rust; `benchmarks/minhash.py` measured it against datasketch on
the same corpus, see ``docs/scaling.md``), seeded, so every process computes the same values.
"""

from __future__ import annotations

import hashlib
import io
import re
from typing import Any

import numpy as np

WORD = re.compile(r"\w+")
MINHASH_SEED = 1
"""Seed of the MinHash permutations (part of the builder's code version, not of the spec)."""


def shingles(text: str, ngram: int) -> list[str]:
    """Lower-cased word n-grams of ``text`` (all its words as one shingle when it has fewer; the text
    itself when it has no words, so that two documents of symbols only are not near-copies)."""
    words = WORD.findall(text.lower())
    if not words:
        return [text]
    if len(words) <= ngram:
        return [" ".join(words)]
    return [" ".join(words[i : i + ngram]) for i in range(len(words) - ngram + 1)]


def minhash_signature(text: str, ngram: int, num_perm: int) -> np.ndarray:
    """``num_perm`` uint32 MinHash values of the text's shingles."""
    from rensa import RMinHash

    sketch = RMinHash(num_perm=num_perm, seed=MINHASH_SEED)
    sketch.update(shingles(text, ngram))
    return np.asarray(sketch.digest(), dtype=np.uint32)


PHASH_SIZE = 8
"""imagehash's hash_size: 8 x 8 DCT bits per colour channel, 192 bits in all (at 16 x 16 the extra
high-frequency bits of smooth pictures flip under a mere resize: ~200 of 768 bits)."""
PHASH_BITS = 3 * PHASH_SIZE * PHASH_SIZE


def image_phash(source: Any) -> np.ndarray:
    """The perceptual hash of an image file (path or bytes) as ``PHASH_BITS / 64`` uint64 words.

    imagehash's DCT phash of each of R, G and B (a grey-level hash alone maps images that differ
    only in colour onto one hash). JPEGs are decoded at reduced size (``draft``): the hash looks at a
    32 x 32 thumbnail anyway. Raises ``OSError``/``ValueError``
    for data that does not decode."""
    import imagehash
    from PIL import Image

    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        image.draft("RGB", (PHASH_SIZE * 8, PHASH_SIZE * 8))
        rgb = image.convert("RGB")
    bits = np.concatenate([imagehash.phash(band, hash_size=PHASH_SIZE).hash.ravel() for band in rgb.split()])
    return np.packbits(bits).view(">u8").astype(np.uint64)


def hamming(a: np.ndarray, b: np.ndarray) -> int:
    """Bits that differ between two ``image_phash`` values."""
    return sum(int(x).bit_count() for x in np.bitwise_xor(a, b))


_WORD_HASHES: dict[str, int] = {}
_WORD_CACHE = 1 << 20
"""Words whose hash is kept (web text is Zipfian: most words of a document are in the cache)."""
_GRAM_BASE = np.uint64(0x9E3779B97F4A7C15)
"""Odd multiplier of the polynomial that combines word hashes into an n-gram hash (mod 2**64)."""


def _word_hash(word: str) -> int:
    value = _WORD_HASHES.get(word)
    if value is None:
        value = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
        if len(_WORD_HASHES) >= _WORD_CACHE:
            _WORD_HASHES.clear()
        _WORD_HASHES[word] = value
    return value


def ngram_hashes(text: str, n: int) -> set[int]:
    """64-bit hashes of the lower-cased word ``n``-grams of ``text`` (none when it has fewer words).

    Each word is hashed once (blake2b, cached) and the ``n`` word hashes of a gram are combined as
    a polynomial mod 2**64 with numpy, so the cost is a dictionary lookup per word, not a hash per
    gram; the same in every process (no Python ``hash``)."""
    words = WORD.findall(text.lower())
    count = len(words) - n + 1
    if count <= 0:
        return set()
    hashes = np.fromiter((_word_hash(w) for w in words), dtype=np.uint64, count=len(words))
    grams = hashes[:count].copy()
    with np.errstate(over="ignore"):
        for k in range(1, n):
            grams = grams * _GRAM_BASE + hashes[k : k + count]
    return set(grams.tolist())
