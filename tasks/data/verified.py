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


def _known(build_dir: Path) -> dict[str, list[int]]:
    try:
        return dict(read_json(verified_path(build_dir))["shards"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def split_unchanged(build_dir: Path, records: Iterable[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    """(records unchanged since their last full check, records to hash)."""
    known = {path: tuple(stat) for path, stat in _known(build_dir).items()}
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
    """Record the stats: the unchanged shards keep their entry, the ones just hashed get theirs (none
    recorded when every shard was too recent to trust)."""
    known = _known(build_dir)
    shards = {rec["path"]: known[rec["path"]] for rec in unchanged if rec["path"] in known}
    shards.update({path: list(stat) for path, stat in checked.items()})
    if shards != known:
        atomic_write_json(verified_path(build_dir), {"shards": dict(sorted(shards.items()))})


def forget_verified(build_dir: Path) -> None:
    """Drop the recorded stats (the build is being repaired or rebuilt: check everything next time)."""
    verified_path(build_dir).unlink(missing_ok=True)
