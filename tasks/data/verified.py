"""Which shards of a finished build need hashing again when the build is reused.

A full check hashes every shard (sha256 against its record). At real scale that is terabytes on
every retrain, so after a full check the build keeps ``verified.json``: the size, mtime, ctime and
inode each shard had just before it was hashed. On reuse, a shard whose four values are unchanged
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
from pathlib import Path
from typing import Any

from tasks.core.identity import atomic_write_json, read_json

VERIFIED = "verified.json"
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


def split_unchanged(build_dir: Path, records: Iterable[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    """(records unchanged since their last full check, records to hash) by ``verified.json``."""
    try:
        known = {path: tuple(stat) for path, stat in read_json(build_dir / VERIFIED)["shards"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        known = {}
    unchanged, fresh = [], []
    for rec in records:
        stat = shard_stat(build_dir, rec)
        (unchanged if stat is not None and known.get(rec["path"]) == stat else fresh).append(rec)
    return unchanged, fresh


def stats_before_check(build_dir: Path, records: Iterable[dict[str, Any]]) -> dict[str, Stat]:
    """The stat of each shard taken now, before hashing, minus the shards too recent to trust."""
    now = time.time_ns()
    out = {}
    for rec in records:
        stat = shard_stat(build_dir, rec)
        if stat is not None and max(stat[1], stat[2]) < now - RACY_NS:
            out[rec["path"]] = stat
    return out


def record_verified(build_dir: Path, unchanged: Iterable[dict[str, Any]], checked: dict[str, Stat]) -> None:
    """Write ``verified.json``: the unchanged shards keep their entry, the ones just hashed get theirs."""
    try:
        known = read_json(build_dir / VERIFIED)["shards"]
    except (OSError, ValueError, KeyError, TypeError):
        known = {}
    shards = {rec["path"]: known[rec["path"]] for rec in unchanged if rec["path"] in known}
    shards.update({path: list(stat) for path, stat in checked.items()})
    atomic_write_json(build_dir / VERIFIED, {"shards": dict(sorted(shards.items()))})
