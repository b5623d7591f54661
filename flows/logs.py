"""Logging set-up for entry points (never at import time of library code): a quiet console, a full log file.

The console shows the pipeline's own messages (``tasks``, ``flows``, ``model`` at INFO, the
warnings our flow tasks log through Prefect) and other libraries' errors. Everything else (Prefect's
state lines and the tracebacks of failures we report ourselves, Ray's driver and worker output,
transformers' and torch's warnings) goes to ``<work_dir>/logs/mvlm-<time>-<pid>.log`` only;
``--verbose`` shows it all on the console too, at DEBUG.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

console = Console(width=None if sys.stdout.isatty() else 160)
"""Shared console for CLI output (tables, summaries); 160 columns when piped to a file."""
OURS = ("tasks", "flows", "model", "__main__")
"""Loggers whose messages are the pipeline's own."""
_state: dict[str, Any] = {}


class ConsoleFilter(logging.Filter):
    """What reaches the console when not ``--verbose``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "console", True):
            return False
        top = record.name.split(".")[0]
        if top in OURS:
            return record.levelno >= logging.INFO
        if record.name.startswith(("prefect.flow_runs", "prefect.task_runs")):
            # our tasks' warnings (get_run_logger); Prefect's failure tracebacks are for the file
            return record.levelno == logging.WARNING and record.exc_info is None
        return record.levelno >= logging.ERROR and top != "prefect"


def setup_logging(verbose: bool = False, log_dir: Path | None = None) -> Path:
    """Route logging to the console (rich) and to a log file, once per process; returns the file."""
    from rich.logging import RichHandler

    if "file" in _state:
        return _state["file"]
    if log_dir is None:
        from tasks.core.settings import get_settings

        log_dir = get_settings().work_dir / "logs"
    path = log_dir / f"mvlm-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    file = logging.FileHandler(path, delay=True)
    file.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    width = None if sys.stderr.isatty() else 160
    screen = RichHandler(
        console=Console(stderr=True, width=width), show_path=False, rich_tracebacks=True, markup=False
    )
    if not verbose:
        screen.addFilter(ConsoleFilter())
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.addHandler(screen)
    root.addHandler(file)
    logging.captureWarnings(True)  # torch's FutureWarnings and the like become log records
    for noisy in ("httpx", "urllib3", "filelock", "httpcore", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not verbose:
        os.environ["MVLM_RAY_WORKER_LOGS"] = "file"  # read by tasks.core.parallel.ensure_ray
        os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")  # MLflow's records propagate to ours
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    sys.meta_path.insert(0, _TransformersLogs())
    _state["file"] = path
    return path


def log_file() -> Path | None:
    """This process's log file (None before ``setup_logging``)."""
    return _state.get("file")


def report_failure(err: BaseException) -> None:
    """One line for the user naming what went wrong; the traceback goes to the log file."""
    logging.getLogger("flows.errors").error("%s", err, exc_info=err, extra={"console": False})
    message = err.args[0] if err.args else str(err)
    console.print(f"[red]error:[/red] {message}", highlight=False)
    if log_file() is not None:
        console.print(f"details: {log_file()}", highlight=False)


class _TransformersLogs(importlib.abc.MetaPathFinder):
    """transformers installs its own stderr handler on first use: once its logging module is loaded,
    that handler is removed and its records propagate to ours (the file, and the console filter)."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != "transformers.utils.logging":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            run(module)
            module.disable_default_handler()
            module.enable_propagation()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec
