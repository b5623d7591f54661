"""Webdataset shards written deterministically and atomically, with a verified sidecar record.

A shard ``NAME.tar`` is complete when its sidecar ``NAME.tar.json`` (sha256, samples, tokens,
bytes) exists and the tar's sha256 matches it. Tar members get fixed owner, mode and mtime, so the
same samples give the same bytes on every run.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tasks.core import faults
from tasks.core.identity import atomic_write_json, read_json, sha256_file

SAFE_KEY = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


@dataclass(frozen=True)
class ShardRecord:
    """What a finished shard holds."""

    path: str
    """Path relative to the build folder."""
    split: str
    """``train`` or ``heldout``."""
    subset: str
    """Subset the samples came from."""
    sha256: str
    """sha256 of the tar bytes."""
    samples: int
    """Number of training samples (a text shard's tar samples each pack several sequences: this counts
    the sequences)."""
    tokens: int
    """Number of tokens (text kinds; 0 otherwise)."""
    bytes: int
    """Size of the tar file."""


def check_key(key: str) -> str:
    """Refuse sample keys that could become paths (only letters, digits, ``_`` and ``-``)."""
    if not key or len(key) > 200 or not set(key) <= SAFE_KEY:
        raise ValueError(f"unsafe sample key {key!r}: use letters, digits, '_' and '-' only")
    return key


def write_shard(
    build_dir: Path, relpath: str, samples: Iterable[dict[str, Any]], split: str, subset: str
) -> ShardRecord:
    """Write ``samples`` (webdataset dicts with ``__key__``) to ``build_dir/relpath`` atomically."""
    import webdataset as wds

    target = build_dir / relpath
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    count = tokens = 0
    try:
        with os.fdopen(fd, "wb") as handle:
            # an int mtime: a float one costs every member a 1 KiB PAX header
            writer = wds.TarWriter(handle, user="mvlm", group="mvlm", mode=0o444, mtime=0)
            for sample in samples:
                check_key(sample["__key__"])
                tokens += int(sample.pop("__tokens__", 0))
                count += int(sample.pop("__samples__", 1))
                writer.write(sample)
                faults.hit("shard-sample")
            writer.close()
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        faults.hit("shard-commit")
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    record = ShardRecord(relpath, split, subset, sha256_file(target), count, tokens, target.stat().st_size)
    atomic_write_json(Path(f"{target}.json"), asdict(record))
    return record


def shard_problem(build_dir: Path, record: ShardRecord | dict, deep: bool = True) -> str | None:
    """Why the shard does not match its record (``missing``, ``size mismatch ...``, ``sha256 mismatch``),
    or None when it exists with the recorded size (and, if ``deep``, sha256)."""
    rec = record if isinstance(record, dict) else asdict(record)
    path = build_dir / rec["path"]
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != rec["bytes"]:
        return f"size mismatch ({size} bytes, recorded {rec['bytes']})"
    if deep and sha256_file(path) != rec["sha256"]:
        return "sha256 mismatch"
    return None


def verify_shard(build_dir: Path, record: ShardRecord | dict, deep: bool = True) -> bool:
    """True when the shard exists with the recorded size (and, if ``deep``, sha256)."""
    return shard_problem(build_dir, record, deep) is None


def is_temp_name(name: str) -> bool:
    """Names of the temp files that ``write_shard`` and ``atomic_write_*`` rename into place."""
    return name.startswith(".") and name.endswith(".tmp")


def remove_stray_temps(folder: Path) -> list[Path]:
    """Delete temp files (``.NAME.*.tmp``) that a killed write left under ``folder``; returns them.

    Only call this while holding the folder's build lock: a live writer's temp file looks the same.
    """
    removed = []
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            if is_temp_name(name):
                path = Path(root) / name
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed.append(path)
    return removed


def finished_shard(build_dir: Path, relpath: str) -> ShardRecord | None:
    """The record of a shard already written and verified, else None (a half-written one is removed)."""
    sidecar = build_dir / f"{relpath}.json"
    if not sidecar.is_file():
        with contextlib.suppress(FileNotFoundError):
            (build_dir / relpath).unlink()
        return None
    record = ShardRecord(**read_json(sidecar))
    return record if verify_shard(build_dir, record) else None


def npy_bytes(array: Any) -> bytes:
    """An array as .npy bytes."""
    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
