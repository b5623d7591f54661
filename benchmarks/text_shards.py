"""Tokens/s per core of the whole text build path vs ``tokenizers``' own ``Tokenizer.encode_batch``.

Ours is ``tasks.data.build.build_dataset`` on a generated corpus of jsonl files in a fresh temporary data
root each repeat (identity, source hashing, scan + tokenize, partitioned exact dedup, pack, shard
writing, manifest) on real Ray, the same with MinHash near-duplicate search on (a second ratio)
and with eval decontamination on (``decontaminate: {ngram: 13}`` against an index of 20,000
questions of 16 words drawn from another corpus, so nothing is rejected: a third ratio), after a
warm-up build so worker start-up is not counted. The reference is the
same tokenizer's Rust ``encode_batch`` on the same documents in this process, with nothing else
(no reading, no dedup, no packing, no writing). Both rates count the same tokens (the documents'
token ids), divided by the cores each used. The ratio ours/reference is printed last.

With ``--tokenizer llama`` both sides use the real LLaMA SentencePiece tokenizer (32,000 pieces, from
llama.cpp's test vocabulary; ``make llama-vocab``) instead of one trained on the corpus.

    python benchmarks/text_shards.py [--mb 32] [--files 4] [--repeats 3] [--vocab 4096] [--seq-len 2048]
                                     [--tokenizer trained|llama]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tasks.data.contamination import EvalIndex

EXACT = "{exact: true}"
MINHASH = "{exact: true, minhash: {threshold: 0.8, ngram: 5, num_perm: 128, bands: 16}}"
DECONTAMINATE = "decontaminate: {ngram: 13}"
QUESTIONS = 20_000
"""Questions in the benchmark's eval index (the six benchmarks hold ~37,000, most under 13 words)."""
SPEC = """\
name: bench-text
kind: text
profile: tiny
license: CC0-1.0
tokenizer: tokenizer
seq_len: {seq_len}
shard_samples: 256
max_failure_ratio: 0.0
dedup: {dedup}
{extra}
subsets:
  - {{name: web, source: {{type: files, paths: ["raw/*.jsonl"]}}}}
"""

_ONSETS = ("b", "c", "d", "f", "g", "l", "m", "n", "p", "r", "s", "t", "v", "br", "st", "tr", "pl", "")
_NUCLEI = ("a", "e", "i", "o", "u", "ai", "ou", "ea")
_CODAS = ("", "n", "r", "s", "t", "l", "nd", "st")


def make_documents(megabytes: float, seed: int = 0) -> list[str]:
    """Distinct English-looking documents (pseudo-words, sentences, paragraphs) totalling ``megabytes``."""
    rng = random.Random(seed)
    words = sorted(
        {
            "".join(rng.choice(part) for part in (_ONSETS, _NUCLEI, _CODAS) * rng.randint(1, 3))
            for _ in range(3000)
        }
        - {""}
    )
    weights = [1 / (rank + 1) for rank in range(len(words))]  # Zipf-like, as in real text
    docs, size, target = [], 0, int(megabytes * 1e6)
    while size < target:
        paragraphs = []
        for _ in range(rng.randint(1, 4)):
            sentences = []
            for _ in range(rng.randint(2, 8)):
                sentence = rng.choices(words, weights, k=rng.randint(5, 25))
                sentences.append(" ".join(sentence).capitalize() + rng.choice(".!?."))
            paragraphs.append(" ".join(sentences))
        doc = f"Document {len(docs)}. " + "\n\n".join(paragraphs)
        docs.append(doc)
        size += len(doc.encode())
    return docs


def write_root(
    root: Path,
    docs: list[str],
    files: int,
    tokenizer_dir: Path,
    seq_len: int,
    dedup: str = "{exact: true}",
    extra: str = "",
) -> Path:
    """A data root with the corpus split over ``files`` jsonl files, the tokenizer and the spec."""
    (root / "raw").mkdir(parents=True)
    per_file = -(-len(docs) // files)
    for i in range(files):
        lines = "".join(json.dumps({"text": d}) + "\n" for d in docs[i * per_file : (i + 1) * per_file])
        (root / "raw" / f"part-{i:03d}.jsonl").write_text(lines)
    shutil.copytree(tokenizer_dir, root / "tokenizer")
    spec = root / "specs" / "bench-text.yaml"
    spec.parent.mkdir()
    spec.write_text(SPEC.format(seq_len=seq_len, dedup=dedup, extra=extra))
    return spec


def question_index(docs: list[str]) -> EvalIndex:
    """An eval index of ``QUESTIONS`` 16-word spans of ``docs`` (another corpus than the one built)."""
    from tasks.data.contamination import EvalIndex
    from tasks.data.signatures import ngram_hashes

    rng = random.Random(7)
    grams: dict[int, tuple[str, str]] = {}
    long_docs = [d.split() for d in docs if len(d.split()) > 16]
    for q in range(QUESTIONS):
        words = rng.choice(long_docs)
        start = rng.randrange(len(words) - 16)
        for gram in ngram_hashes(" ".join(words[start : start + 16]), 13):
            grams.setdefault(gram, ("bench-eval", str(q)))
    return EvalIndex((), grams, 13, {"bench-eval": {"questions": QUESTIONS}})


def make_tokenizer(kind: str, docs: list[str], vocab_size: int, out: Path) -> str:
    """Save the tokenizer both sides use into ``out``; returns how to name it in the report."""
    from model.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
    from tasks.testkit.llama_cpp_source import fetch_llama_vocab, released_tokenizer

    if kind == "trained":
        train_tokenizer(docs[:2000], vocab_size=vocab_size, out_dir=out)
        return f"{vocab_size}, trained on the corpus"
    released = released_tokenizer(fetch_llama_vocab(), out.parent / "released")
    save_tokenizer(load_tokenizer(released), out)  # tokenizer.json (the reference reads it) + .model
    return "32000, LLaMA SentencePiece"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=32.0, help="corpus size in MB of UTF-8 text")
    parser.add_argument("--files", type=int, default=4, help="jsonl files (build units)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--tokenizer", choices=("trained", "llama"), default="trained")
    args = parser.parse_args()
    os.environ.setdefault("MVLM_NO_PROGRESS", "1")

    import ray
    from tokenizers import Tokenizer

    from tasks.core.parallel import ensure_ray
    from tasks.data.build import build_dataset

    docs = make_documents(args.mb)
    work = Path(tempfile.mkdtemp(prefix="bench-text-shards-"))
    try:
        vocab = make_tokenizer(args.tokenizer, docs, args.vocab, work / "tok")
        ensure_ray()
        ray_cpus = int(ray.cluster_resources().get("CPU", 1))
        cores_ours = min(ray_cpus, args.files)  # one Ray task (num_cpus=1) per unit
        # Warm-up: start the Ray workers and import everything once (a small corpus, its own root).
        build_dataset(
            write_root(work / "warmup", docs[:50], args.files, work / "tok", args.seq_len), work / "warmup"
        )

        index = question_index(make_documents(2.0, seed=1))
        ours, manifest = [], None
        near: list[float] = []
        clean: list[float] = []
        variants = ((EXACT, "", None, ours), (MINHASH, "", None, near), (EXACT, DECONTAMINATE, index, clean))
        for r in range(args.repeats):
            for dedup, extra, eval_index, times in variants:
                root = work / f"run{r}"
                spec = write_root(root, docs, args.files, work / "tok", args.seq_len, dedup, extra)
                start = time.perf_counter()
                result = build_dataset(spec, root, force=True, eval_index=eval_index)
                times.append(time.perf_counter() - start)
                assert not result.reused
                manifest = manifest or result.manifest
                shutil.rmtree(root)

        reference = Tokenizer.from_file(str(work / "tok" / "tokenizer.json"))
        cores_ref = int(os.environ.get("RAYON_RS_NUM_CPUS") or os.cpu_count() or 1)  # encode_batch's pool
        reference.encode_batch(docs[:200], add_special_tokens=False)  # warm-up
        ref, tokens = [], 0
        for _ in range(args.repeats):
            start = time.perf_counter()
            encodings = reference.encode_batch(docs, add_special_tokens=False)
            ref.append(time.perf_counter() - start)
            tokens = sum(len(e.ids) for e in encodings)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    totals = manifest["stats"]["totals"]
    # Same documents, same tokens: ours also appends one EOS per document and drops the last partial
    # sequence of each unit and split.
    assert totals["tokens"] + totals["tail_tokens_dropped"] == tokens + len(docs), (totals, tokens)
    t_ours, t_ref = statistics.median(ours), statistics.median(ref)
    ours_rate = tokens / t_ours / cores_ours
    ref_rate = tokens / t_ref / cores_ref
    mb = sum(len(d.encode()) for d in docs) / 1e6
    print(
        f"corpus: {len(docs)} documents, {mb:.1f} MB in {args.files} jsonl files, {tokens:,} tokens "
        f"(vocab {vocab}), seq_len {args.seq_len}; {args.repeats} repeats, median"
    )
    print(
        f"ours      build_dataset (Ray, {cores_ours} cores: {ray_cpus} Ray CPUs, {args.files} units) "
        f"{t_ours:7.3f} s  {tokens / t_ours:12,.0f} tok/s  {ours_rate:12,.0f} tok/s/core  "
        f"({totals['sequences']} sequences, {len(manifest['shards'])} shards)"
    )
    print(
        f"reference tokenizers Tokenizer.encode_batch (1 process, {cores_ref} rayon threads)   "
        f"{t_ref:7.3f} s  {tokens / t_ref:12,.0f} tok/s  {ref_rate:12,.0f} tok/s/core"
    )
    t_near = statistics.median(near)
    print(
        f"ours+minhash build_dataset with dedup {MINHASH}          "
        f"{t_near:7.3f} s  {tokens / t_near:12,.0f} tok/s  {tokens / t_near / cores_ours:12,.0f} tok/s/core"
    )
    print(f"ratio ours+minhash/reference tokens/s per core: {tokens / t_near / cores_ours / ref_rate:.3f}")
    t_clean = statistics.median(clean)
    clean_rate = tokens / t_clean / cores_ours
    print(
        f"ours+decontaminate build_dataset, 13-grams against {len(index.ngrams):,} question n-grams "
        f"{t_clean:7.3f} s  {tokens / t_clean:12,.0f} tok/s  {clean_rate:12,.0f} tok/s/core"
    )
    print(f"ratio ours+decontaminate/reference tokens/s per core: {clean_rate / ref_rate:.3f}")
    bytes_per_token = sum(r["bytes"] for r in manifest["shards"]) / totals["tokens"]
    print(f"shards on disk: {bytes_per_token:.3f} bytes per token at seq_len {args.seq_len}")
    print(f"ratio ours/reference tokens/s per core: {ours_rate / ref_rate:.3f}")


if __name__ == "__main__":
    main()
