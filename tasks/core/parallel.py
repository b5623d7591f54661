"""Fan-out inside a task with Ray: local Ray by default, a cluster when ``RAY_ADDRESS`` is set.

With ``MVLM_RAY_WORKER_LOGS=file`` (the CLI sets it unless ``--verbose``), Ray's driver messages and
its workers' output become ordinary log records (the CLI's log file) instead of console lines.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from rich import get_console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

log = logging.getLogger(__name__)
T = TypeVar("T")


def ensure_ray() -> None:
    """Connect to ``RAY_ADDRESS`` or start a local Ray once per process."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or None
    to_logging = os.environ.get("MVLM_RAY_WORKER_LOGS") == "file"
    if to_logging:  # Ray's own logger prints to stderr through its handler: make it propagate to ours
        ray_logger = logging.getLogger("ray")
        for handler in list(ray_logger.handlers):
            ray_logger.removeHandler(handler)
        ray_logger.propagate = True
    log.debug("starting Ray (%s)", address or "local")
    ray.init(
        address=address,
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=True,
        ignore_reinit_error=True,
    )
    if to_logging:
        _worker_output_to_logging()


def _worker_output_to_logging() -> None:
    """Workers' stdout/stderr become records of the ``ray_workers`` logger (the CLI's log file) instead
    of lines on the driver's console. Uses Ray's driver-side log dispatcher; if that is not there (a
    Ray that changed it), Ray's own printing stays."""
    try:
        from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # pragma: no cover - depends on Ray's internals
        return
    workers = logging.getLogger("ray_workers")  # not under "ray": Ray gives that logger its own handler

    def forward(data: dict[str, Any]) -> None:
        where = data.get("actor_name") or data.get("task_name") or f"pid={data.get('pid')}"
        level = logging.WARNING if data.get("is_err") else logging.INFO
        for line in data.get("lines", []):
            workers.log(level, "(%s) %s", where, line)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("mvlm_worker_logs", forward)


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
        # bars only on a terminal: piped into a file, a transient bar leaves an empty line behind
        disable=os.environ.get("MVLM_NO_PROGRESS") == "1" or not get_console().is_terminal,
    )
