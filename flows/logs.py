"""Logging set-up for entry points (never at import time of library code)."""

from __future__ import annotations

import logging

from rich.console import Console

console = Console()
"""Shared console for CLI output (tables, summaries)."""


def setup_logging(level: int = logging.INFO) -> None:
    """Route stdlib logging through rich, once, at the CLI entry point."""
    from rich.logging import RichHandler

    root = logging.getLogger()
    if any(isinstance(h, RichHandler) for h in root.handlers):
        return
    handler = RichHandler(show_path=False, rich_tracebacks=True, markup=False)
    logging.basicConfig(level=level, format="%(message)s", datefmt="[%X]", handlers=[handler])
    for noisy in ("transformers", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
