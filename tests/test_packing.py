"""Packing: the same sequences as a reference packer, and time linear in the document's length."""

from __future__ import annotations

import random
import time

from tasks.data.text import Packer


def _reference_pack(docs: list[list[int]], seq_len: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    """Concatenate everything, cut every ``seq_len``, starts relative to each sequence."""
    stream = [t for d in docs for t in d]
    offsets, pos = [], 0
    for d in docs:
        offsets.append(pos)
        pos += len(d)
    full = len(stream) // seq_len
    out = []
    for k in range(full):
        lo, hi = k * seq_len, (k + 1) * seq_len
        out.append((stream[lo:hi], [o - lo for o in offsets if lo <= o < hi]))
    return out, len(stream) - full * seq_len


def test_packer_gives_the_reference_sequences_and_starts() -> None:
    rng = random.Random(7)
    docs = [
        [rng.randrange(500) for _ in range(rng.choice([1, 3, 17, 64, 65, 300, 1000]))] for _ in range(400)
    ]
    packer = Packer(64)
    got = [seq for d in docs for seq in packer.add(d)]
    expected, leftover = _reference_pack(docs, 64)
    assert got == expected
    assert packer.leftover == leftover


def _pack_seconds(tokens: int, seq_len: int = 2048) -> float:
    doc = list(range(tokens))
    packer = Packer(seq_len)
    start = time.perf_counter()
    count = sum(1 for _ in packer.add(doc))
    elapsed = time.perf_counter() - start
    assert count == tokens // seq_len
    return elapsed


def test_one_long_document_packs_in_time_linear_in_its_length() -> None:
    """A 4M-token document takes about 4x a 1M-token one (the old packer took ~50x: quadratic)."""
    one = min(_pack_seconds(1_000_000) for _ in range(3))
    four = min(_pack_seconds(4_000_000) for _ in range(2))
    print(f"pack 1M tokens {one:.3f} s, 4M tokens {four:.3f} s, ratio {four / one:.1f}")
    assert four < 8 * one + 0.2, (one, four)
