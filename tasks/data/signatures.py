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
    """Lower-cased word n-grams of ``text`` (all its words as one shingle when it has fewer)."""
    words = WORD.findall(text.lower())
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


def ngram_hashes(text: str, n: int) -> set[int]:
    """64-bit hashes of the lower-cased word ``n``-grams of ``text`` (none when it has fewer words)."""
    words = WORD.findall(text.lower())
    grams = (" ".join(words[i : i + n]) for i in range(len(words) - n + 1))
    return {int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little") for g in grams}
