"""Which shards of a finished build need hashing again when the build is reused.

A full check hashes every shard (sha256 against its record). At real scale that is terabytes on
every retrain, so after a full check this machine keeps ``.<build id>.verified.json`` beside the
build folder (machine state, like the build's lock, not part of the build): the size, mtime, ctime
and inode each shard had just before it was hashed. On reuse, a shard whose four values are unchanged
is checked by existence and size only (as git's index does); any write to it, a truncation, a
replacement or a restored mtime changes its ctime, so it is hashed again. What this cannot see is
media corruption of a file nobody wrote: ``mvlm data build --verify-all`` hashes everything.

A shard written or checked within ``RACY_NS`` of the check is hashed next time too: a write in the
same clock tick could leave its times unchanged.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.core.identity import atomic_write_json, read_json

RACY_NS = 2_000_000_000
"""Shards whose mtime or ctime is this close to the time of their check are not trusted next time."""

Stat = tuple[int, int, int, int]


def shard_stat(build_dir: Path, record: dict[str, Any]) -> Stat | None:
    """(size, mtime_ns, ctime_ns, inode) of a shard, or None when it is not there."""
    try:
        st = os.stat(build_dir / record["path"])
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def verified_path(build_dir: Path) -> Path:
    """Where the shard stats of a build's last full check are kept."""
    return build_dir.parent / f".{build_dir.name}.verified.json"


@dataclass
class ShardCheck:
    """One reuse check planned from a single stat of every shard and a single read of the record."""

    unchanged: list[dict[str, Any]]
    """Records whose shard has the stat recorded at its last full check (checked by size only)."""
    fresh: list[dict[str, Any]]
    """Records to hash."""
    recorded: dict[str, list[int]]
    """The stats on record before this check."""
    entries: dict[str, list[int]]
    """What to record once the fresh shards verify: the unchanged entries, plus the stat each fresh
    shard had before hashing unless it is too recent to trust."""


def plan_check(build_dir: Path, records: Iterable[dict[str, Any]]) -> ShardCheck:
    """Split ``records`` into unchanged and to-hash shards; the stats are taken now, before hashing."""
    try:
        recorded = {path: list(stat) for path, stat in read_json(verified_path(build_dir))["shards"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        recorded = {}
    check = ShardCheck([], [], recorded, {})
    recent = time.time_ns() - RACY_NS
    for rec in records:
        stat = shard_stat(build_dir, rec)
        if stat is not None and recorded.get(rec["path"]) == list(stat):
            check.unchanged.append(rec)
            check.entries[rec["path"]] = list(stat)
            continue
        check.fresh.append(rec)
        if stat is not None and max(stat[1], stat[2]) < recent:
            check.entries[rec["path"]] = list(stat)
    return check


def record_verified(build_dir: Path, check: ShardCheck) -> None:
    """Record the check's entries once its fresh shards verified (not rewritten when unchanged)."""
    if check.entries != check.recorded:
        atomic_write_json(verified_path(build_dir), {"shards": dict(sorted(check.entries.items()))})


def forget_verified(build_dir: Path) -> None:
    """Drop the recorded stats (the build is being repaired or rebuilt: check everything next time)."""
    verified_path(build_dir).unlink(missing_ok=True)
