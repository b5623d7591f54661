"""Inter-process locks: two processes never build the same identity at once.

A lock is an ``flock`` on a file beside the output (works across processes on one machine and on
NFS v4 / most shared filesystems). The holder re-checks for a finished output after acquiring, so
the second of two concurrent builders reuses the first one's result instead of building again.
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


@contextlib.contextmanager
def exclusive(path: str | Path, timeout_s: float = 24 * 3600, poll_s: float = 0.5) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing); waits up to ``timeout_s``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not announced:
                    log.info("waiting for %s (another process is building the same thing)", path)
                    announced = True
                if time.monotonic() > deadline:
                    raise TimeoutError(f"could not lock {path} within {timeout_s:.0f}s") from None
                time.sleep(poll_s)
        yield
    finally:
        os.close(fd)  # closing releases the lock
