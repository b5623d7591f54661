"""Peak Python memory of the build driver during exact dedup: partitioned (ours) vs global (reference).

Ours is the text builder's scan + partitioned reduce (``tasks.data.text.scan_unit`` and
``tasks.data.dedup.run_reduce``) on real Ray over a generated corpus of small documents; the driver
only passes paths and per-unit records. The reference is the global dedup the builder had before:
every unit's document hashes returned to the driver as lists and merged into one ``seen`` set
(``find_duplicates``), run on the same Ray workers. ``tracemalloc`` measures the driver's peak
Python allocations (Ray's returned objects included) during each. Run at two sizes to see growth::

    python benchmarks/dedup_memory.py --docs 200000
    python benchmarks/dedup_memory.py --docs 2000000

The ratio ours/reference of the driver's peak is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path

SPEC = """\
name: bench-dedup
kind: text
profile: tiny
license: CC0-1.0
tokenizer: samples/tokenizer
seq_len: 2048
shard_samples: 2048
max_failure_ratio: 0.0
dedup: {{exact: true, partitions: {partitions}}}
subsets:
  - {{name: web, source: {{type: files, paths: ["raw/*.jsonl"]}}}}
"""


def write_corpus(root: Path, docs: int, files: int, duplicates: float, seed: int = 0) -> None:
    """``docs`` short documents over ``files`` jsonl files, a ``duplicates`` share of them copies."""
    rng = random.Random(seed)
    (root / "raw").mkdir(parents=True)
    per_file = -(-docs // files)
    n = 0
    for f in range(files):
        with open(root / "raw" / f"part-{f:03d}.jsonl", "w") as out:
            for _ in range(min(per_file, docs - n)):
                i = rng.randrange(n) if n and rng.random() < duplicates else n
                out.write(json.dumps({"text": f"document {i} about the red circle number {i * 7919}"}) + "\n")
                n += 1


def global_hashes(unit, ctx) -> dict:
    """The old scan's result: every kept document's hash, as a list of hex strings."""
    from tasks.data.text import doc_hash
    from tasks.data.text_sources import read_docs

    return {"hashes": [doc_hash(d.text) for d in read_docs(unit, ctx) if d.text is not None]}


def peak_mb(fn) -> tuple[float, float, object]:
    """(peak MB of Python allocations in this process, seconds, result) of ``fn()``."""
    tracemalloc.start()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] / 1e6
    tracemalloc.stop()
    return peak, seconds, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=200_000)
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--partitions", type=int, default=16)
    parser.add_argument("--duplicates", type=float, default=0.1)
    args = parser.parse_args()
    os.environ.setdefault("MVLM_NO_PROGRESS", "1")

    from tasks.core.parallel import ensure_ray, ray_map
    from tasks.data.build import make_context
    from tasks.data.dedup import run_reduce
    from tasks.data.text import dedup_plan, scan_unit
    from tasks.data.text_sources import plan_units
    from tasks.testkit.sample_tree import make_samples

    work = Path(tempfile.mkdtemp(prefix="bench-dedup-"))
    try:
        make_samples(work / "samples")
        write_corpus(work, args.docs, args.files, args.duplicates)
        (work / "specs").mkdir()
        (work / "specs" / "bench-dedup.yaml").write_text(SPEC.format(partitions=args.partitions))
        ctx = make_context(work / "specs" / "bench-dedup.yaml", work)
        ctx.out.mkdir(parents=True)
        units = plan_units(ctx)
        ensure_ray()
        ray_map(global_hashes, units[:1], ctx)  # warm-up: workers started, modules imported

        def ours():
            scans = ray_map(scan_unit, units, ctx)
            return run_reduce(dedup_plan(ctx), scans, ray_map, "bench")["exact_drops"]

        def reference():
            seen: set[str] = set()
            drops = 0
            for scan in ray_map(global_hashes, units, ctx):
                hashes = set(scan["hashes"])
                drops += len(scan["hashes"]) - len(hashes) + len(hashes & seen)
                seen |= hashes
            return drops

        ours_mb, ours_s, ours_drops = peak_mb(ours)
        ref_mb, ref_s, ref_drops = peak_mb(reference)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert ours_drops == ref_drops, (ours_drops, ref_drops)
    print(f"corpus: {args.docs:,} documents in {args.files} files, {ref_drops:,} exact copies; "
          f"{args.partitions} partitions")  # fmt: skip
    print(f"ours      partitioned (scan, tokenize, reduce)  driver peak {ours_mb:9.1f} MB  {ours_s:7.1f} s  "
          f"{ours_mb * 1e6 / args.docs:7.1f} B/document")  # fmt: skip
    print(f"reference global set (hash scan only)         driver peak {ref_mb:9.1f} MB  {ref_s:7.1f} s  "
          f"{ref_mb * 1e6 / args.docs:7.1f} B/document")  # fmt: skip
    print(f"ratio ours/reference driver peak memory: {ours_mb / ref_mb:.4f}")


if __name__ == "__main__":
    main()
