"""Signatures for near-duplicate search: MinHash of a text's word n-grams, perceptual hash of an image.

MinHash is rensa's ``RMinHash`` (Rust; `benchmarks/minhash.py` measured it against datasketch on
the same corpus, see ``docs/scaling.md``), seeded, so every process computes the same values.
"""

from __future__ import annotations

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


def image_phash(image: Any) -> np.ndarray:
    """The 64-bit DCT perceptual hash (imagehash.phash) of a PIL image, as a one-value uint64 array."""
    import imagehash

    bits = imagehash.phash(image).hash.ravel()
    return np.array([int("".join("1" if b else "0" for b in bits), 2)], dtype=np.uint64)
