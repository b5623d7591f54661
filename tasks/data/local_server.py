"""A throwaway loopback HTTP server for sample files (the CPU profile's stand-in for the internet).

``serve_directory(root)`` serves a folder on a free port of a loopback address for the duration of a
``with`` block and yields its base URL; sample URL lists carry the literal placeholder
``{LOCAL_SERVER}`` that ``substitute_server`` replaces with that URL.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import socket
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

LOCAL_SERVER_PLACEHOLDER = "{LOCAL_SERVER}"
"""Literal text in sample URL lists that stands for the local server's base URL."""

_LOCALHOST_NAMES = ("localhost",)


def _resolve_loopback(host: str) -> tuple[str, socket.AddressFamily]:
    """The loopback address to bind for ``host`` and its address family; ValueError for anything else."""
    if host.lower() in _LOCALHOST_NAMES:
        return "127.0.0.1", socket.AF_INET
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError as err:
        raise ValueError(
            f"host {host!r} is not a loopback address; the sample server only binds 127.0.0.0/8, ::1 "
            "or 'localhost'"
        ) from err
    if not address.is_loopback:
        raise ValueError(
            f"host {host!r} is not a loopback address; the sample server only binds 127.0.0.0/8, ::1 "
            "or 'localhost' (it must never be reachable from other machines)"
        )
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    return str(address), family


class _QuietHandler(SimpleHTTPRequestHandler):
    """Static file handler that logs through ``logging`` (debug) instead of writing to stderr."""

    def log_message(self, format: str, *args: Any) -> None:
        """Route the request log line to the module logger at debug level."""
        logger.debug("%s - %s", self.address_string(), format % args)


class _LoopbackServer(ThreadingHTTPServer):
    """Threading HTTP server whose connection errors go to ``logging`` rather than stderr."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log a failed request (client hung up, ...) at debug level with the traceback."""
        logger.debug("error while serving %s", client_address, exc_info=True)


def _base_url(address: str, family: socket.AddressFamily, port: int) -> str:
    """``http://host:port`` with IPv6 literals bracketed."""
    host = f"[{address}]" if family == socket.AF_INET6 else address
    return f"http://{host}:{port}"


@contextlib.contextmanager
def serve_directory(root: Path, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve ``root`` over HTTP on a free port of loopback ``host``; yield the base URL.

    Missing files answer 404. The server runs in a daemon thread and is shut down and closed when
    the ``with`` block exits. Raises ValueError for a non-loopback ``host`` and FileNotFoundError
    when ``root`` is not a folder.
    """
    address, family = _resolve_loopback(host)
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"cannot serve {root}: not a folder")
    handler = functools.partial(_QuietHandler, directory=str(root.resolve()))
    server_class = type("_Server", (_LoopbackServer,), {"address_family": family})
    server = server_class((address, 0), handler)
    port = server.server_address[1]
    url = _base_url(address, family, port)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name=f"serve-{port}", daemon=True
    )
    thread.start()
    logger.debug("serving %s at %s", root, url)
    try:
        yield url
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        logger.debug("stopped serving %s at %s", root, url)


def substitute_server(text: str, base_url: str) -> str:
    """Replace every ``{LOCAL_SERVER}`` in ``text`` with ``base_url`` (trailing slash dropped)."""
    return text.replace(LOCAL_SERVER_PLACEHOLDER, base_url.rstrip("/"))
