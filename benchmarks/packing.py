"""Packing one long document: ``tasks.data.text.Packer`` vs the packer it replaced (quadratic).

The old packer re-sliced its whole buffer for every full sequence, so one document of N tokens cost
O(N^2 / seq_len); ours moves an offset and compacts once per document. Both pack the same
documents of 1M and 4M tokens into ``seq_len`` sequences (same output, checked); the reference runs
on 1M tokens only (4M takes it minutes). Printed: seconds per size, ours 4M/1M (linear: ~4), and last
the ratio reference/ours at 1M tokens.

    python benchmarks/packing.py [--seq-len 2048] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterator

from tasks.data.text import Packer


class QuadraticPacker:
    """The packer before: a new buffer list for every full sequence."""

    def __init__(self, seq_len: int) -> None:
        self.seq_len, self.buffer, self.starts = seq_len, [], []

    def add(self, ids: list[int]) -> Iterator[tuple[list[int], list[int]]]:
        self.starts.append(len(self.buffer))
        self.buffer.extend(ids)
        while len(self.buffer) >= self.seq_len:
            seq, self.buffer = self.buffer[: self.seq_len], self.buffer[self.seq_len :]
            starts = [s for s in self.starts if s < self.seq_len]
            self.starts = [s - self.seq_len for s in self.starts if s >= self.seq_len]
            yield seq, starts


def seconds(packer_cls: type, tokens: int, seq_len: int, repeats: int) -> tuple[float, list]:
    times, out = [], []
    for _ in range(repeats):
        packer = packer_cls(seq_len)
        start = time.perf_counter()
        out = list(packer.add(list(range(tokens))))
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ours_1m, packed = seconds(Packer, 1_000_000, args.seq_len, args.repeats)
    ours_4m, _ = seconds(Packer, 4_000_000, args.seq_len, args.repeats)
    ref_1m, reference = seconds(QuadraticPacker, 1_000_000, args.seq_len, 1)
    assert packed == reference, "the two packers disagree"
    print(f"ours: 1M tokens {ours_1m:.3f} s, 4M tokens {ours_4m:.3f} s (4M/1M = {ours_4m / ours_1m:.1f})")
    print(f"reference (quadratic): 1M tokens {ref_1m:.3f} s")
    print(f"ratio reference/ours at 1M tokens: {ref_1m / ours_1m:.1f}")


if __name__ == "__main__":
    main()
