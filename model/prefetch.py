"""Work one step ahead on a helper thread: the next item is prepared while the current one is used.

Torch-free on purpose, so the evaluation harness can use it without importing PyTorch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def ahead(items: Sequence[T], prepare: Callable[[T], R]) -> Iterator[tuple[T, R]]:
    """``(item, prepare(item))`` in order, the next item's ``prepare`` running on a helper thread
    while the caller uses the current one (an exception in ``prepare`` is raised here, in order)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare-ahead") as pool:
        pending = pool.submit(prepare, items[0]) if items else None
        for k, item in enumerate(items):
            ready = pending.result()
            pending = pool.submit(prepare, items[k + 1]) if k + 1 < len(items) else None
            yield item, ready
