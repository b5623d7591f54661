"""Fan-out inside a task with Ray: local Ray by default, a cluster when ``RAY_ADDRESS`` is set."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

log = logging.getLogger(__name__)
T = TypeVar("T")


def ensure_ray() -> None:
    """Connect to ``RAY_ADDRESS`` or start a local Ray once per process."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or None
    log.info("starting Ray (%s)", address or "local")
    ray.init(
        address=address,
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=True,
        ignore_reinit_error=True,
    )


def ray_map(
    fn: Callable[..., T], items: Sequence[Any], *args: Any, label: str = "work", **kwargs: Any
) -> list[T]:
    """``[fn(item, *args, **kwargs) for item in items]`` as Ray tasks, in order, with a progress bar."""
    import ray

    if not items:
        return []
    ensure_ray()
    remote = ray.remote(num_cpus=1, max_retries=1)(fn)
    shared_args = [ray.put(a) for a in args]
    refs = [remote.remote(item, *shared_args, **kwargs) for item in items]
    pending = list(refs)
    with _progress() as progress:
        bar = progress.add_task(label, total=len(refs))
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done)  # surface a worker's exception as soon as it happens
            progress.advance(bar, len(done))
    return ray.get(refs)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=True,
        disable=os.environ.get("MVLM_NO_PROGRESS") == "1",
    )
