"""Inter-process locks: two processes never build, create or send the same identity at once.

A lock is an ``flock`` on a file beside the output (works across processes on one machine and on
NFS v4 / most shared filesystems). The holder re-checks for a finished output after acquiring, so
the second of two concurrent builders reuses the first one's result instead of building again.
``exclusive`` keeps its lock file; ``claimed`` removes it on release (outbox payload locks, one per
identity, would otherwise pile up), which is why ``acquire`` checks that the file it locked is still
the one at the path.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


def acquire(path: Path, wait_s: float, poll_s: float = 0.05, on_wait: str | None = None) -> int | None:
    """An fd holding an exclusive flock on the file at ``path`` now, or None after ``wait_s``.

    ``on_wait``, when given, is logged once if another process holds the lock.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if on_wait:
                log.info("waiting for %s (%s)", path, on_wait)
                on_wait = None
            if time.monotonic() >= deadline:
                return None
            time.sleep(poll_s)
            continue
        held = os.fstat(fd)
        try:
            now = os.stat(path)
        except FileNotFoundError:
            now = None
        if now is not None and (now.st_ino, now.st_dev) == (held.st_ino, held.st_dev):
            return fd
        os.close(fd)  # the previous holder removed the file we locked: lock the current one


@contextlib.contextmanager
def exclusive(path: str | Path, timeout_s: float = 24 * 3600, poll_s: float = 0.5) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing); waits up to ``timeout_s``, then raises."""
    path = Path(path)
    fd = acquire(path, timeout_s, poll_s, on_wait="another process is building the same thing")
    if fd is None:
        raise TimeoutError(f"could not lock {path} within {timeout_s:.0f}s")
    try:
        yield
    finally:
        os.close(fd)  # closing releases the lock


@contextlib.contextmanager
def claimed(path: str | Path, wait_s: float = 0.0) -> Iterator[bool]:
    """Hold the lock at ``path``, removed again on release; yields False when another process held it
    for ``wait_s``."""
    path = Path(path)
    fd = acquire(path, wait_s)
    try:
        yield fd is not None
    finally:
        if fd is not None:
            path.unlink(missing_ok=True)  # while held: a waiter that opened it sees the inode change
            os.close(fd)
