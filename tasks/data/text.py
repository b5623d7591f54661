"""Text builds: read, normalise, filter, de-duplicate, tokenize, pack, write shards.

Two parallel passes over the units (Ray tasks): a scan that normalises, filters and keys every
document (``tasks.data.dedup``: exact keys, MinHash signatures), then, after the dedup reduce
(partitioned by key; the first copy in source order is kept), a pass that
tokenizes the kept documents, appends EOS, packs them into ``seq_len`` sequences with no padding
(document starts recorded) and writes the shards. A tar sample packs ``PACK_TOKENS`` worth of
sequences: ``input_ids.npy`` of shape (sequences, seq_len) (uint16 when the vocabulary fits, else
int32) and ``doc_starts.npy`` (int32: where documents start in the flattened sample), so headers
cost ~0.05 byte per token; ``tasks.data.shard_read.text_rows`` splits a sample into its sequences.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from tasks.core.identity import atomic_path, atomic_write_bytes
from tasks.data.builder import (
    BuildContext,
    FanOut,
    Unit,
    UnitResult,
    finished_unit,
    save_unit,
)
from tasks.data.contamination import check_sample
from tasks.data.dedup import (
    DedupPlan,
    NearRule,
    UnitKeys,
    run_reduce,
    scan_record,
    scan_rejects,
    scan_wheres,
    unit_drops,
)
from tasks.data.rejects import Reject
from tasks.data.shards import finished_shard, npy_bytes, write_shard
from tasks.data.signatures import minhash_signature
from tasks.data.text_sources import Doc, plan_units, read_docs

log = logging.getLogger(__name__)
TOKENIZE_BATCH = 256
PACK_TOKENS = 1 << 16
"""Tokens per tar sample (32 sequences of 2048): tar and npy headers cost ~0.05 byte per token."""


# --- pass 1: scan --------------------------------------------------------------------------------


def doc_hash(text: str) -> str:
    """Exact-duplicate key of a normalised document."""
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def dedup_plan(ctx: BuildContext) -> DedupPlan:
    """Where this build's dedup files live and what they look for."""
    spec = ctx.spec.dedup
    near = None
    if spec.minhash is not None:
        near = NearRule("minhash", spec.minhash.bands, spec.minhash.threshold, "near_duplicate")
    return DedupPlan(str(ctx.out / "dedup"), spec.partitions, spec.exact, near)


def tokens_path(ctx: BuildContext, unit: int) -> Path:
    """A scanned unit's token ids (kept documents, in order, no EOS), until the unit is packed."""
    return ctx.out / "tokens" / f"{unit:05d}.bin"


def scan_unit(unit: Unit, ctx: BuildContext) -> dict[str, Any]:
    """Read, filter, tokenize and key one unit: token ids to ``tokens/``, dedup rows to ``dedup/``
    (skipped when already scanned and its tokens are there, or its shards are already verified)."""
    plan = dedup_plan(ctx)
    done = scan_record(plan, unit.index)
    if done is not None and (tokens_path(ctx, unit.index).is_file() or unit.index in ctx.verified_units):
        return done
    from model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(ctx.tokenizer_path)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {ctx.tokenizer_path} has no eos token")
    backend = tokenizer.backend_tokenizer
    minhash = ctx.spec.dedup.minhash
    keys, rejects = UnitKeys(plan), []
    docs: list[tuple[int, int, int]] = []  # (tokens, heldout, read ordinal) per kept document
    batch: list[tuple[int, str, str]] = []
    target = tokens_path(ctx, unit.index)
    target.parent.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(backend.get_vocab_size())
    read = 0
    with atomic_path(target) as tmp, open(tmp, "wb") as handle:

        def flush() -> None:
            ids = [
                e.ids for e in backend.encode_batch_fast([t for _, _, t in batch], add_special_tokens=False)
            ]
            for (ordinal, h, _), one in zip(batch, ids, strict=True):
                docs.append((len(one), is_heldout(h, ctx.spec.heldout_fraction), ordinal))
            handle.write(np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype).tobytes())
            batch.clear()

        for doc in read_docs(unit, ctx):
            read += 1
            if doc.text is not None and (bad := check_sample(ctx, None, [doc.text])):
                doc = Doc(doc.where, None, *bad, doc.text[:80])
            if doc.text is None:
                rejects.append([read - 1, asdict(Reject(doc.reason, unit.subset, unit.source, doc.where,
                                                        doc.detail, doc.raw))])  # fmt: skip
                continue
            h = doc_hash(doc.text)
            sig = minhash_signature(doc.text, minhash.ngram, minhash.num_perm) if minhash else None
            keys.add(h, doc.where, sig)
            batch.append((read - 1, h, doc.text))
            if len(batch) >= TOKENIZE_BATCH:
                flush()
        if batch:
            flush()
    atomic_write_bytes(target.with_suffix(".docs.npy"), npy_bytes(np.array(docs, np.int64).reshape(-1, 3)))
    counts = {"read": read, "eos": tokenizer.eos_token_id, "vocab": backend.get_vocab_size()}
    return keys.save(unit.index, unit.subset, unit.source, counts, rejects)


def token_dtype(vocab_size: int) -> Any:
    """uint16 when every id fits, else int32."""
    return np.uint16 if vocab_size <= 65535 else np.int32


# --- pass 2: tokenize, pack, write ---------------------------------------------------------------


def is_heldout(text_hash: str, fraction: float) -> bool:
    """Stable held-out assignment from the document hash."""
    return fraction > 0 and int(text_hash[:8], 16) / 0xFFFFFFFF < fraction


class Packer:
    """Concatenate tokenized documents into fixed-length sequences, recording document starts.

    Linear in the tokens added: full sequences are cut by moving an offset through the buffer, which
    is compacted once per ``add`` (a 4M-token document costs four times a 1M-token one)."""

    def __init__(self, seq_len: int) -> None:
        self.seq_len = seq_len
        self.buffer: list[int] = []
        self.starts: list[int] = []

    def add(self, ids: list[int]) -> Iterator[tuple[list[int], list[int]]]:
        """Append a document; yield every sequence that became full."""
        self.starts.append(len(self.buffer))
        self.buffer.extend(ids)
        offset, first_start = 0, 0
        while len(self.buffer) - offset >= self.seq_len:
            end = offset + self.seq_len
            last_start = first_start
            while last_start < len(self.starts) and self.starts[last_start] < end:
                last_start += 1
            starts = [s - offset for s in self.starts[first_start:last_start]]
            yield self.buffer[offset:end], starts
            offset, first_start = end, last_start
        if offset:
            del self.buffer[:offset]
            self.starts = [s - offset for s in self.starts[first_start:]]

    @property
    def leftover(self) -> int:
        """Tokens that did not fill a last sequence (dropped, counted)."""
        return len(self.buffer)


def pack_unit(unit: Unit, ctx: BuildContext, scan: dict[str, Any]) -> UnitResult:
    """Pack one scanned unit's kept documents (EOS after each) and write its shards; the copies dedup
    found become rejects, in source order with the scan's."""
    if (done := finished_unit(ctx, unit.index)) is not None:
        return done
    dtype = token_dtype(scan["counts"]["vocab"])
    streams = {split: _ShardStream(ctx, unit, split, dtype) for split in ("train", "heldout")}
    packers = {split: Packer(ctx.spec.seq_len) for split in streams}
    plan = dedup_plan(ctx)
    drops = unit_drops(plan, unit.index) if plan.exact or plan.near else {}
    path = tokens_path(ctx, unit.index)
    docs = np.load(path.with_suffix(".docs.npy"))
    tokens = np.fromfile(path, dtype=dtype)
    ends = np.cumsum(docs[:, 0])
    wheres = scan_wheres(plan, unit.index)
    found: list[tuple[int, dict[str, str]]] = [(at, row) for at, row in scan_rejects(plan, unit.index)]
    eos = [scan["counts"]["eos"]]
    for pos, (length, heldout, ordinal) in enumerate(docs.tolist()):
        if (drop := drops.get(pos)) is not None:
            what = "exact duplicate" if drop.reason == "duplicate" else "near-duplicate"
            reject = Reject(drop.reason, unit.subset, unit.source, wheres[pos], f"{what} of {drop.kept}")
            found.append((ordinal, asdict(reject)))
            continue
        split = "heldout" if heldout else "train"
        for seq, starts in packers[split].add([*tokens[ends[pos] - length : ends[pos]].tolist(), *eos]):
            streams[split].add(seq, starts)
    records = [rec for split in streams for rec in streams[split].close()]
    rejects = [row for _, row in sorted(found, key=lambda item: item[0])]
    counts = {"read": scan["counts"]["read"], "rejected": len(rejects), "documents": len(docs) - len(drops)}
    counts["kept"] = counts["read"] - counts["rejected"]
    counts["tokens"] = sum(r["tokens"] for r in records)
    counts["tail_tokens_dropped"] = sum(p.leftover for p in packers.values())
    counts["sequences"] = sum(r["samples"] for r in records)
    result = save_unit(ctx, UnitResult(unit.index, unit.subset, records, counts, rejects))
    path.unlink(missing_ok=True)  # the shards hold the tokens now; a rebuild of this unit rescans it
    return result


class _ShardStream:
    """Collect sequences of one split, ``sequences_per_sample`` to a tar sample, and write a shard every
    ``shard_samples`` sequences."""

    def __init__(self, ctx: BuildContext, unit: Unit, split: str, dtype: Any) -> None:
        self.ctx, self.unit, self.split, self.dtype = ctx, unit, split, dtype
        self.per_sample = sequences_per_sample(ctx.spec.seq_len, ctx.spec.shard_samples)
        self.rows: list[list[int]] = []
        self.starts: list[int] = []
        self.samples: list[dict[str, Any]] = []
        self.records: list[dict[str, Any]] = []
        self.count = self.in_shard = 0

    def add(self, seq: list[int], starts: list[int]) -> None:
        offset = len(self.rows) * len(seq)
        self.starts.extend(offset + s for s in starts)
        self.rows.append(seq)
        self.in_shard += 1
        if len(self.rows) >= self.per_sample or self.in_shard >= self.ctx.spec.shard_samples:
            self._seal()
        if self.in_shard >= self.ctx.spec.shard_samples:
            self._write()

    def _seal(self) -> None:
        """Turn the collected rows into one tar sample."""
        key = f"{self.unit.subset.replace('.', '-')}-{self.unit.index:05d}-{self.count:08d}"
        self.count += 1
        self.samples.append(
            {
                "__key__": key,
                "input_ids.npy": npy_bytes(np.asarray(self.rows, dtype=self.dtype)),
                "doc_starts.npy": npy_bytes(np.asarray(self.starts, dtype=np.int32)),
                "__tokens__": sum(map(len, self.rows)),
                "__samples__": len(self.rows),
            }
        )
        self.rows, self.starts = [], []

    def _write(self) -> None:
        rel = f"shards/{self.split}/{self.unit.subset}-{self.unit.index:05d}-{len(self.records):05d}.tar"
        done = finished_shard(self.ctx.out, rel)
        record = done or write_shard(self.ctx.out, rel, self.samples, self.split, self.unit.subset)
        self.records.append(asdict(record))
        self.samples, self.in_shard = [], 0

    def close(self) -> list[dict[str, Any]]:
        if self.rows:
            self._seal()
        if self.samples:
            self._write()
        return self.records


def sequences_per_sample(seq_len: int, shard_samples: int) -> int:
    """Sequences packed into one tar sample: ``PACK_TOKENS`` worth, at least one, at most a shard."""
    return max(1, min(shard_samples, PACK_TOKENS // seq_len))


def build_text(ctx: BuildContext, fan_out: FanOut) -> list[UnitResult]:
    """All units of a text spec: scan (tokenize, key), de-duplicate (partitioned by key), pack."""
    units = plan_units(ctx)
    if not units:
        raise ValueError(f"spec {ctx.spec.name}: no input files")
    pending = [u for u in units if finished_unit(ctx, u.index) is None]
    if not pending:
        return [finished_unit(ctx, u.index) for u in units]
    scans = fan_out(scan_unit, units, ctx, label=f"{ctx.spec.name}: scan+tokenize")
    plan = dedup_plan(ctx)
    if plan.exact or plan.near:
        found = run_reduce(plan, scans, fan_out, ctx.spec.name)
        log.debug("%s: dedup found %s", ctx.spec.name, found)  # the build table shows kept and rejected
    jobs = list(zip(units, scans, strict=True))
    return fan_out(_pack_job, jobs, ctx, label=f"{ctx.spec.name}: pack")


def _pack_job(job: tuple[Unit, dict[str, Any]], ctx: BuildContext) -> UnitResult:
    return pack_unit(job[0], ctx, job[1])
