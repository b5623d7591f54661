"""MinHash signatures: rensa's RMinHash (ours, what ``tasks.data.signatures`` uses) vs datasketch's
MinHash (reference), on the same corpus, the same shingles and the same number of permutations.

Speed: documents per second of signature computation from the shingle lists (shingling is shared
and not timed). Accuracy: on pairs of a document and an edited copy (5-30% of words replaced), the
mean absolute error of each library's Jaccard estimate against the exact Jaccard of the shingle
sets. The ratio ours/reference of documents per second is printed last.

    python benchmarks/minhash.py [--docs 5000] [--num-perm 128] [--ngram 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import numpy as np


def corpus(docs: int, seed: int = 0) -> tuple[list[str], list[tuple[str, str]]]:
    """Documents of 100-400 pseudo-words, and (document, edited copy) pairs for accuracy."""
    rng = random.Random(seed)
    vocab = [f"w{rng.getrandbits(20):x}" for _ in range(5000)]
    texts = [" ".join(rng.choices(vocab, k=rng.randint(100, 400))) for _ in range(docs)]
    pairs = []
    for text in texts[:300]:
        words = text.split()
        for i in rng.sample(range(len(words)), int(len(words) * rng.uniform(0.05, 0.30))):
            words[i] = rng.choice(vocab)
        pairs.append((text, " ".join(words)))
    return texts, pairs


def rensa_sig(shingles: list[str], num_perm: int) -> np.ndarray:
    from rensa import RMinHash

    sketch = RMinHash(num_perm=num_perm, seed=1)
    sketch.update(shingles)
    return np.asarray(sketch.digest(), dtype=np.uint64)


def datasketch_sig(shingles: list[str], num_perm: int) -> np.ndarray:
    from datasketch import MinHash

    sketch = MinHash(num_perm=num_perm, seed=1)
    sketch.update_batch([s.encode() for s in shingles])
    return sketch.hashvalues


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=5000)
    parser.add_argument("--num-perm", type=int, default=128)
    parser.add_argument("--ngram", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from tasks.data.signatures import shingles

    texts, pairs = corpus(args.docs)
    shingled = [shingles(t, args.ngram) for t in texts]
    results = {}
    for name, fn in (("rensa", rensa_sig), ("datasketch", datasketch_sig)):
        fn(shingled[0], args.num_perm)  # warm-up (imports, permutation tables)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            for sh in shingled:
                fn(sh, args.num_perm)
            times.append(time.perf_counter() - start)
        errors = []
        for a, b in pairs:
            sa, sb = set(shingles(a, args.ngram)), set(shingles(b, args.ngram))
            exact = len(sa & sb) / len(sa | sb)
            est = float(np.mean(fn(list(sa), args.num_perm) == fn(list(sb), args.num_perm)))
            errors.append(abs(est - exact))
        results[name] = (args.docs / statistics.median(times), statistics.mean(errors))
    words = sum(len(t.split()) for t in texts) / len(texts)
    print(f"corpus: {args.docs} documents, {words:.0f} words on average; {args.ngram}-word shingles, "
          f"{args.num_perm} permutations; {args.repeats} repeats (median); "
          f"{len(pairs)} edited pairs")  # fmt: skip
    for label, name in (("ours     ", "rensa"), ("reference", "datasketch")):
        rate, err = results[name]
        print(f"{label} {name:10s} {rate:10,.0f} documents/s (1 core)  mean |estimate - Jaccard| {err:.4f}")
    print(f"ratio ours/reference documents/s: {results['rensa'][0] / results['datasketch'][0]:.2f}")


if __name__ == "__main__":
    main()
