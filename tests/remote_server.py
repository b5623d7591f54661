"""A loopback HTTP file server for fetcher tests: HEAD, ETag, Range/If-Range, 404, and dropped
connections on demand (``drop_after[path] = N`` cuts the next full GET of ``path`` after N bytes)."""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class ServerState:
    """What the server serves and what it saw."""

    root: Path
    """Folder served."""
    drop_after: dict[str, int] = field(default_factory=dict)
    """Path -> bytes after which the next GET without a Range header is cut (once)."""
    requests: list[tuple[str, str, str]] = field(default_factory=list)
    """(method, path, Range header) of every request."""


def _handler(state: ServerState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def _file(self) -> Path | None:
            path = (state.root / self.path.lstrip("/").split("?")[0]).resolve()
            return path if path.is_file() and path.is_relative_to(state.root.resolve()) else None

        def _serve(self, body: bool) -> None:
            state.requests.append((self.command, self.path, self.headers.get("Range", "")))
            path = self._file()
            if path is None:
                self.send_error(404)
                return
            data = path.read_bytes()
            etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
            start, status = 0, 200
            wanted = self.headers.get("Range")
            if wanted and self.headers.get("If-Range", etag) == etag:
                start = int(wanted.split("=")[1].split("-")[0])
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.end_headers()
                    return
                status = 206
            self.send_response(status)
            self.send_header("Content-Length", str(len(data) - start))
            self.send_header("ETag", etag)
            self.send_header("Accept-Ranges", "bytes")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if not body:
                return
            cut = state.drop_after.pop(self.path, None) if not wanted else None
            self.wfile.write(data[start:] if cut is None else data[:cut])
            if cut is not None:
                self.wfile.flush()
                self.close_connection = True

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

    return Handler


@contextlib.contextmanager
def serve(root: Path) -> Iterator[tuple[str, ServerState]]:
    """Serve ``root`` on 127.0.0.1 (a free port); yields (base URL, state)."""
    state = ServerState(root)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()
