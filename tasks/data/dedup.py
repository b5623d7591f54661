"""Partitioned de-duplication: exact copies and near-copies, with no process holding every key.

A build's dedup runs in three steps on the driver's fan-out, each writing files under
``<build>/dedup/`` atomically (a finished step is skipped on resume; the results do not depend on
scheduling, so a resumed build writes the same shards byte for byte):

1. **scan** (per unit, ``UnitKeys``): every kept sample gets its exact key (128 bits of its sha256)
   and, with a near-duplicate rule, a signature (MinHash values of a text, or an image's 64-bit
   perceptual hash) and band keys. Rows are spread over ``partitions`` buckets by key.
2. **reduce** (per bucket, ``reduce_bucket``): the bucket's rows from every unit, sorted. Exact: each
   copy after the first (in unit, position order) is dropped, naming the first. Near: members that
   share a band key and whose signatures pass the rule become edges to the earliest such member.
3. **cluster** (one task, ``cluster_edges``): union-find over the edges (memory grows with the
   near-duplicates found, not with the documents); every member of a component but its earliest is
   dropped, naming the earliest.

``unit_drops`` gives the packing step its unit's drops. The driver only passes paths and counts.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.core import faults
from tasks.core.identity import atomic_write_bytes, atomic_write_json, read_json
from tasks.data.shards import npy_bytes

EXACT = np.dtype([("h1", "<u8"), ("h2", "<u8"), ("pos", "<u4")])
BAND = np.dtype([("key", "<u8"), ("pos", "<u4")])
DROP = np.dtype([("unit", "<u4"), ("pos", "<u4"), ("kept_unit", "<u4"), ("kept_pos", "<u4")])
_MIX = np.uint64(0x100000001B3)
COMPARE_ELEMENTS = 1 << 24
"""Signature values compared at once within a band group (bounds the memory of a big group)."""


@dataclass(frozen=True)
class NearRule:
    """How near-duplicates are found: band keys of a signature, then a check of each candidate pair."""

    kind: str
    """``minhash`` (signature: MinHash values) or ``phash`` (signature: ``image_phash`` words)."""
    bands: int
    """Band keys per sample (minhash: bands of the signature; phash: bit blocks, pigeonhole)."""
    threshold: float
    """minhash: least share of equal signature values; phash: largest Hamming distance."""
    reason: str
    """Reject reason of a dropped near-copy."""


@dataclass(frozen=True)
class DedupPlan:
    """Where a build's dedup files live and what they find (picklable for Ray workers)."""

    folder: str
    """``<build>/dedup``."""
    partitions: int
    """Buckets the keys are spread over (one reduce task each)."""
    exact: bool
    """Find exact copies."""
    near: NearRule | None = None
    """Find near-copies too."""

    def path(self, *parts: str) -> Path:
        """A file under the dedup folder."""
        return Path(self.folder).joinpath(*parts)


def split_key(hex_digest: str) -> tuple[int, int]:
    """The two 64-bit halves of a 32-hex exact key."""
    return int(hex_digest[:16], 16), int(hex_digest[16:32], 16)


def band_keys(signatures: np.ndarray, rule: NearRule) -> np.ndarray:
    """``(samples, bands)`` uint64 keys: each band's values mixed with the band number."""
    if rule.kind == "phash":  # pigeonhole: copies within ``threshold`` bits share one whole block
        bits = np.unpackbits(signatures.astype(">u8").view(np.uint8), axis=1)
        blocks = [np.packbits(b, axis=1) for b in np.array_split(bits, rule.bands, axis=1)]
        width = max(b.shape[1] for b in blocks)
        rows = np.stack([np.pad(b, ((0, 0), (0, width - b.shape[1]))) for b in blocks], axis=1)
    else:
        rows = signatures.astype(np.uint64).reshape(len(signatures), rule.bands, -1)
    keys = np.arange(1, rule.bands + 1, dtype=np.uint64)[None, :] * np.uint64(0x9E3779B97F4A7C15)
    keys = np.broadcast_to(keys, rows.shape[:2]).copy()
    with np.errstate(over="ignore"):
        for j in range(rows.shape[2]):
            keys = (keys ^ rows[:, :, j]) * _MIX
    return keys


class UnitKeys:
    """The dedup rows of one unit, collected during its scan and saved as ``scan/NNNNN.*``."""

    def __init__(self, plan: DedupPlan) -> None:
        self.plan = plan
        self.exact: list[tuple[int, int]] = []
        self.signatures: list[np.ndarray] = []
        self.wheres: list[str] = []

    def add(self, exact_hex: str, where: str, signature: np.ndarray | None = None) -> None:
        """One kept sample, in unit order: its exact key, where it is, its signature (near rule)."""
        self.exact.append(split_key(exact_hex))
        self.wheres.append(where)
        if self.plan.near is not None:
            assert signature is not None, "a near-duplicate rule needs a signature per sample"
            self.signatures.append(signature)

    def save(
        self, unit: int, subset: str, source: str, counts: dict[str, int], rejects: list | None = None
    ) -> dict[str, Any]:
        """Write the unit's bucketed rows, signatures, places and the scan's ``rejects`` (rows of
        ``[read ordinal, reject]``: ``scan_rejects``); the record (written last, with the scan's
        ``counts``) says the unit is scanned."""
        stem = f"{unit:05d}"
        record: dict[str, Any] = {"unit": unit, "subset": subset, "source": source, "kept": len(self.wheres)}
        exact = np.zeros(len(self.exact), EXACT)
        if self.exact:
            exact["h1"], exact["h2"] = np.array(self.exact, dtype=np.uint64).T
            exact["pos"] = np.arange(len(self.exact))
        record["exact"] = self._bucketed(stem, "exact", exact, exact["h1"])
        if self.plan.near is not None:
            sigs = np.stack(self.signatures) if self.signatures else np.zeros((0, 1), np.uint64)
            atomic_write_bytes(self.plan.path("scan", f"{stem}.sig.npy"), npy_bytes(sigs))
            keys = band_keys(sigs, self.plan.near) if len(sigs) else np.zeros((0, 1), np.uint64)
            bands = np.zeros(keys.size, BAND)
            bands["key"] = keys.ravel()
            bands["pos"] = np.repeat(np.arange(len(sigs)), keys.shape[1])
            record["bands"] = self._bucketed(stem, "bands", bands, bands["key"])
        atomic_write_json(self.plan.path("scan", f"{stem}.where.json"), self.wheres)
        # the scan's rejects wait in their own file for the pack step: records travel to the driver
        atomic_write_json(self.plan.path("scan", f"{stem}.rejects.json"), rejects or [])
        record |= {"counts": counts, "rejected": len(rejects or [])}
        atomic_write_json(self.plan.path("scan", f"{stem}.json"), record)
        return record

    def _bucketed(self, stem: str, name: str, rows: np.ndarray, key: np.ndarray) -> list[int]:
        """Rows sorted by bucket (stable) into ``scan/NNNNN.<name>.npy``; returns the bucket offsets."""
        bucket = (key % np.uint64(self.plan.partitions)).astype(np.int64)
        order = np.argsort(bucket, kind="stable")
        atomic_write_bytes(self.plan.path("scan", f"{stem}.{name}.npy"), npy_bytes(rows[order]))
        return np.searchsorted(bucket[order], np.arange(self.plan.partitions + 1)).tolist()


def scan_wheres(plan: DedupPlan, unit: int) -> list[str]:
    """Where each kept sample of a scanned unit is (line, row or key), by position."""
    return json.loads(plan.path("scan", f"{unit:05d}.where.json").read_text())


def scan_rejects(plan: DedupPlan, unit: int) -> list[list[Any]]:
    """The rejects a unit's scan found, as ``[read ordinal, reject row]`` pairs in source order."""
    path = plan.path("scan", f"{unit:05d}.rejects.json")
    if path.is_file():
        return json.loads(path.read_text())
    record = scan_record(plan, unit)  # a record written before scans had a rejects file holds them
    return record.get("rejects", []) if record else []


def scan_record(plan: DedupPlan, unit: int) -> dict[str, Any] | None:
    """The record of a unit already scanned, else None."""
    path = plan.path("scan", f"{unit:05d}.json")
    return read_json(path) if path.is_file() else None


def _bucket_rows(plan: DedupPlan, scans: Sequence[dict[str, Any]], name: str, bucket: int) -> np.ndarray:
    """One bucket's rows of every unit, with a ``unit`` column."""
    parts = []
    for scan in scans:
        start, end = scan[name][bucket], scan[name][bucket + 1]
        if end > start:
            rows = np.load(plan.path("scan", f"{scan['unit']:05d}.{name}.npy"), mmap_mode="r")[start:end]
            parts.append((scan["unit"], np.asarray(rows)))
    dtype = EXACT if name == "exact" else BAND
    out = np.zeros(sum(len(r) for _, r in parts), [*((n, dtype[n]) for n in dtype.names), ("unit", "<u4")])
    at = 0
    for unit, rows in parts:
        for field in dtype.names:
            out[field][at : at + len(rows)] = rows[field]
        out["unit"][at : at + len(rows)] = unit
        at += len(rows)
    return out


def _first_of_groups(rows: np.ndarray, keys: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Sort rows by ``keys`` then (unit, pos); return them and each row's group-start index."""
    rows = rows[np.lexsort([rows[k] for k in ("pos", "unit", *reversed(keys))])]
    change = np.ones(len(rows), bool)
    if len(rows) > 1:
        change[1:] = np.any([rows[k][1:] != rows[k][:-1] for k in keys], axis=0)
    start = np.maximum.accumulate(np.where(change, np.arange(len(rows)), 0))
    return rows, start


def reduce_bucket(bucket: int, plan: DedupPlan, scans: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Exact drops and near-duplicate edges of one bucket (skipped when already written)."""
    done = plan.path("reduce", f"{bucket:05d}.json")
    if done.is_file():
        return read_json(done)
    counts = {"exact_drops": 0, "near_edges": 0}
    if plan.exact:
        rows, start = _first_of_groups(_bucket_rows(plan, scans, "exact", bucket), ("h1", "h2"))
        dup = np.arange(len(rows)) != start
        drops = _drop_rows(
            rows["unit"][dup], rows["pos"][dup], rows["unit"][start[dup]], rows["pos"][start[dup]]
        )
        atomic_write_bytes(plan.path("reduce", f"{bucket:05d}.exact.npy"), npy_bytes(drops))
        counts["exact_drops"] = len(drops)
    if plan.near is not None:
        edges = _near_edges(plan, _bucket_rows(plan, scans, "bands", bucket))
        atomic_write_bytes(plan.path("reduce", f"{bucket:05d}.edges.npy"), npy_bytes(edges))
        counts["near_edges"] = len(edges)
    faults.hit("dedup-bucket")
    atomic_write_json(done, counts)
    return counts


def _drop_rows(unit: Any, pos: Any, kept_unit: Any, kept_pos: Any) -> np.ndarray:
    out = np.zeros(len(unit), DROP)
    out["unit"], out["pos"], out["kept_unit"], out["kept_pos"] = unit, pos, kept_unit, kept_pos
    return np.sort(out, order=["unit", "pos"])


def _near_edges(plan: DedupPlan, rows: np.ndarray) -> np.ndarray:
    """Each candidate to the earliest member of its band group whose signature it matches (every
    earlier member is compared, in blocks: a big group costs time, never a missed copy)."""
    assert plan.near is not None
    rows, start = _first_of_groups(rows, ("key",))
    signatures = _gather_signatures(plan, rows)
    firsts = np.flatnonzero(np.arange(len(rows)) == start)
    ends = np.append(firsts[1:], len(rows))
    edges: list[np.ndarray] = []
    for lo, hi in zip(firsts[ends - firsts > 1], ends[ends - firsts > 1], strict=True):
        first = first_similar(signatures[lo:hi], plan.near)
        found = np.flatnonzero(first >= 0)
        if len(found):
            me, other = lo + found, lo + first[found]
            edges.append(
                np.stack([rows["unit"][me], rows["pos"][me], rows["unit"][other], rows["pos"][other]], 1)
            )
    flat = np.concatenate(edges).astype(np.uint32) if edges else np.zeros((0, 4), np.uint32)
    return _drop_rows(*flat.T)


def _gather_signatures(plan: DedupPlan, rows: np.ndarray) -> np.ndarray:
    """The signature of every row (read per unit from ``scan/NNNNN.sig.npy``)."""
    out: np.ndarray | None = None
    for unit in np.unique(rows["unit"]):
        sigs = np.load(plan.path("scan", f"{int(unit):05d}.sig.npy"), mmap_mode="r")
        if out is None:
            out = np.zeros((len(rows), sigs.shape[1]), sigs.dtype)
        mine = rows["unit"] == unit
        out[mine] = sigs[rows["pos"][mine]]
    return out if out is not None else np.zeros((0, 1), np.uint64)


def first_similar(signatures: np.ndarray, rule: NearRule) -> np.ndarray:
    """For each signature of a group (in order), the index of the first earlier one that passes the
    rule, or -1; all pairs are compared, ``COMPARE_ELEMENTS`` values at a time."""
    count, width = signatures.shape
    first = np.full(count, -1, np.int64)
    block = max(1, COMPARE_ELEMENTS // max(1, count * width))
    for lo in range(1, count, block):
        hi = min(count, lo + block)
        mine, earlier = signatures[lo:hi, None, :], signatures[None, : hi - 1, :]
        if rule.kind == "phash":
            ok = np.bitwise_count(mine ^ earlier).sum(axis=2) <= rule.threshold
        else:
            ok = (mine == earlier).mean(axis=2) >= rule.threshold
        ok &= np.arange(hi - 1)[None, :] < np.arange(lo, hi)[:, None]
        hit = ok.any(axis=1)
        first[lo:hi][hit] = ok.argmax(axis=1)[hit]
    return first


def cluster_edges(plan: DedupPlan) -> dict[str, int]:
    """Union-find over every bucket's near edges: each component keeps its earliest member."""
    done = plan.path("near.json")
    if done.is_file():
        return read_json(done)
    parent: dict[int, int] = {}

    def root(x: int) -> int:
        while parent.get(x, x) != x:
            parent[x] = parent.get(parent[x], parent[x])
            x = parent[x]
        return x

    for bucket in range(plan.partitions):
        edges = np.load(plan.path("reduce", f"{bucket:05d}.edges.npy"))
        members, kept = _encode(edges["unit"], edges["pos"]), _encode(edges["kept_unit"], edges["kept_pos"])
        for a, b in zip(members, kept, strict=True):
            ra, rb = root(int(a)), root(int(b))
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    members = np.array(sorted(x for x in parent if root(x) != x), dtype=np.uint64)
    roots = np.array([root(int(x)) for x in members], dtype=np.uint64)
    drops = _drop_rows(members >> np.uint64(32), members & np.uint64(0xFFFFFFFF), roots >> np.uint64(32),
                       roots & np.uint64(0xFFFFFFFF))  # fmt: skip
    atomic_write_bytes(plan.path("near.npy"), npy_bytes(drops))
    counts = {"near_drops": len(drops)}
    atomic_write_json(done, counts)
    return counts


def _encode(unit: np.ndarray, pos: np.ndarray) -> np.ndarray:
    return (unit.astype(np.uint64) << np.uint64(32)) | pos.astype(np.uint64)


def forget_reduce(plan: DedupPlan) -> None:
    """Delete what was found from the scans (a scan was redone: every bucket and cluster depends on it)."""
    shutil.rmtree(plan.path("reduce"), ignore_errors=True)
    for name in ("near.json", "near.npy"):
        plan.path(name).unlink(missing_ok=True)


def run_reduce(
    plan: DedupPlan, scans: Sequence[dict[str, Any]], fan_out: Callable[..., list], label: str
) -> dict:
    """Steps 2 and 3 over the scanned units; returns the drop counts."""
    offsets = [{k: scan[k] for k in ("unit", "exact", "bands") if k in scan} for scan in scans]
    counts = fan_out(reduce_bucket, list(range(plan.partitions)), plan, offsets, label=f"{label}: dedup")
    total = {"exact_drops": sum(c["exact_drops"] for c in counts)}
    if plan.near is not None:
        total |= fan_out(_cluster_job, [plan], label=f"{label}: near-duplicate clusters")[0]
    return total


def _cluster_job(plan: DedupPlan) -> dict[str, int]:
    return cluster_edges(plan)


@dataclass(frozen=True)
class Drop:
    """Why one sample of a unit is dropped, and the sample it is a copy of."""

    reason: str
    """``duplicate`` or the near rule's reason."""
    kept: str
    """The kept sample: ``<subset> <file> <where>``."""


def unit_drops(plan: DedupPlan, unit: int) -> dict[int, Drop]:
    """Position (among the unit's kept samples) -> drop; exact copies before near ones."""
    found: dict[int, tuple[str, int, int]] = {}
    files = [plan.path("near.npy")] if plan.near is not None else []
    reasons = [plan.near.reason] if plan.near is not None else []
    if plan.exact:
        files = [plan.path("reduce", f"{b:05d}.exact.npy") for b in range(plan.partitions)] + files
        reasons = ["duplicate"] * plan.partitions + reasons
    for path, reason in zip(files, reasons, strict=True):
        rows = np.load(path, mmap_mode="r")
        lo, hi = np.searchsorted(rows["unit"], [unit, unit + 1])
        for row in np.asarray(rows[lo:hi]):
            found.setdefault(int(row["pos"]), (reason, int(row["kept_unit"]), int(row["kept_pos"])))
    places: dict[int, tuple[dict, list[str]]] = {}
    out = {}
    for pos, (reason, kept_unit, kept_pos) in sorted(found.items()):
        if kept_unit not in places:
            record = read_json(plan.path("scan", f"{kept_unit:05d}.json"))
            places[kept_unit] = (
                record,
                json.loads(plan.path("scan", f"{kept_unit:05d}.where.json").read_text()),
            )
        record, wheres = places[kept_unit]
        out[pos] = Drop(reason, f"{record['subset']} {Path(record['source']).name} {wheres[kept_pos]}")
    return out
