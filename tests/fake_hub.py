"""A loopback stand-in for the Hugging Face hub's API and file endpoints, serving dataset and model
repositories from folders:
``root/<owner>/<name>/<commit sha>/<files>`` with ``refs.json`` (``{"main": sha}``) beside the commits.

Enough of the hub for the real ``huggingface_hub`` and ``datasets`` clients (``HF_ENDPOINT`` pointed
here): revision info, tree listings, paths-info and ``resolve`` downloads (HEAD, GET, Range)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit


def _commit_dir(root: Path, repo: str, rev: str) -> tuple[str, Path] | None:
    base = root / repo
    refs = json.loads((base / "refs.json").read_text()) if (base / "refs.json").is_file() else {}
    sha = refs.get(rev, rev)
    folder = base / sha
    return (sha, folder) if folder.is_dir() else None


def _entry(folder: Path, path: Path) -> dict:
    rel = str(path.relative_to(folder))
    if path.is_dir():
        return {"type": "directory", "path": rel, "oid": hashlib.sha1(rel.encode()).hexdigest(), "size": 0}
    data = path.read_bytes()
    return {"type": "file", "path": rel, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}


def _handler(root: Path, requests: list[str]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def _json(self, obj: object, status: int = 200) -> None:
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _missing(self, code: str) -> None:
            body = json.dumps({"error": code}).encode()
            self.send_response(404)
            self.send_header("X-Error-Code", code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _route(self) -> None:
            requests.append(f"{self.command} {self.path}")
            parts = urlsplit(self.path)
            segs = [unquote(s) for s in parts.path.strip("/").split("/")]
            if segs[:2] == ["api", "models"] and len(segs) >= 5:  # a model repo: same layout, no prefix
                segs = ["api", "datasets", *segs[2:]]
            elif len(segs) >= 5 and segs[0] not in ("api", "datasets") and segs[2] == "resolve":
                segs = ["datasets", *segs]
            if segs[:2] == ["api", "datasets"] and len(segs) >= 5:
                repo, verb, rev, rest = (
                    "/".join(segs[2:4]),
                    segs[4],
                    segs[5] if len(segs) > 5 else "main",
                    segs[6:],
                )
                found = _commit_dir(root, repo, rev)
                if not (root / repo).is_dir():
                    return self._missing("RepoNotFound")
                if found is None:
                    return self._missing("RevisionNotFound")
                sha, folder = found
                if verb == "revision":
                    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
                    return self._json({"id": repo, "sha": sha, "private": False,
                                       "siblings": [{"rfilename": f} for f in files]})  # fmt: skip
                if verb == "tree":
                    base = folder.joinpath(*rest) if rest else folder
                    recursive = parse_qs(parts.query).get("recursive", ["false"])[0].lower() == "true"
                    items = base.rglob("*") if recursive else base.iterdir()
                    return self._json([_entry(folder, p) for p in sorted(items)])
                if verb == "paths-info":
                    length = int(self.headers.get("Content-Length") or 0)
                    form = parse_qs(self.rfile.read(length).decode())
                    paths = form.get("paths", [])
                    if not paths and form.get("paths[]"):
                        paths = form["paths[]"]
                    out = [_entry(folder, folder / p) for p in paths if (folder / p).exists()]
                    return self._json(out)
            if segs[0] == "datasets" and len(segs) >= 6 and segs[3] == "resolve":
                repo, rev, rel = "/".join(segs[1:3]), segs[4], "/".join(segs[5:])
                found = _commit_dir(root, repo, rev)
                if found is None or not (found[1] / rel).is_file():
                    return self._missing("EntryNotFound")
                sha, folder = found
                data = (folder / rel).read_bytes()
                start, status = 0, 200
                if wanted := self.headers.get("Range"):
                    lo, _, hi = wanted.split("=")[1].partition("-")
                    start, end = int(lo), int(hi) if hi else len(data) - 1
                    data, status = data[start : end + 1], 206
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("ETag", '"' + hashlib.sha1((folder / rel).read_bytes()).hexdigest() + '"')
                self.send_header("X-Repo-Commit", sha)
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                return None
            return self._missing("EntryNotFound")

        do_GET = do_HEAD = do_POST = _route

    return Handler


@contextlib.contextmanager
def serve_hub(root: Path) -> Iterator[tuple[str, list[str]]]:
    """Serve the hub folders under ``root`` on 127.0.0.1; yields (endpoint URL, request log)."""
    requests: list[str] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(root, requests))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()
