"""Fetch published files over HTTP(S): the URL policy at every hop, resume, retries, checksums, a cache.

What a real spec names as URLs (RedPajama's jsonl files, LLaVA's json and image archives) comes
through here, never through a downloader of its own:

* ``describe`` tells what a URL holds now: the publisher's sha256 (a ``<url>.sha256`` file beside
  it, when there is one) and the server's ETag and size. That is the file's part of a build identity.
* ``fetch`` downloads it into the data root's cache, keyed by URL and that description, so new
  upstream data is a new file and a rerun reuses a verified copy. A dropped connection is resumed
  with an HTTP range request (``If-Range`` on the ETag); errors are retried with exponential backoff;
  the sha256 is checked when known and a mismatch deletes the download and fails with our message.
* Every request goes through ``open_url``: the URL policy (``tasks.data.url_policy``) on each URL and each
  redirect (http/https only), and the connect-time address check of the egress guard: the host is
  resolved once, every address checked, and the connection made to a checked address.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from tasks.core.identity import atomic_write_json, hash_json, read_json
from tasks.data.url_policy import HostPolicy, address_problem, url_problem

log = logging.getLogger(__name__)

CHUNK = 1 << 20
MAX_REDIRECTS = 5
TIMEOUT_S = 60.0
SHA256 = re.compile(r"^([0-9a-fA-F]{64})\b")
USER_AGENT = "mobilevlm-pipeline/0.1 (+fetcher)"


class FetchError(RuntimeError):
    """A URL that cannot be fetched; the message names it, what happened and what to do."""


class RemoteMissing(FetchError):
    """The server answered 404 (or 410): the file is not there."""


@dataclass(frozen=True)
class RemoteFile:
    """What a URL holds, as far as the publisher and the server say."""

    url: str
    """The file's URL."""
    sha256: str | None
    """The publisher's sha256 (from ``<url>.sha256``), or None when it gives none."""
    etag: str | None
    """The server's ETag, or None."""
    size: int | None
    """Content-Length of the file, or None."""

    def fingerprint(self) -> dict[str, object]:
        """The identity of this file's content: sha256 when known, else ETag and size."""
        if self.sha256:
            return {"url": self.url, "sha256": self.sha256}
        return {"url": self.url, "etag": self.etag, "size": self.size}


class _CheckedHTTPConnection(http.client.HTTPConnection):
    """Connects only to an address of the host that the policy allows (no second lookup to rebind)."""

    policy = HostPolicy()

    def connect(self) -> None:
        self.sock = _checked_socket(self.host, self.port, self.timeout, self.policy)


class _CheckedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS with the same check; TLS verifies the certificate against the host name."""

    policy = HostPolicy()

    def connect(self) -> None:
        sock = _checked_socket(self.host, self.port, self.timeout, self.policy)
        context = ssl.create_default_context()
        self.sock = context.wrap_socket(sock, server_hostname=self.host)


def _checked_socket(host: str, port: int, timeout: float | None, policy: HostPolicy) -> socket.socket:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    for *_, sockaddr in infos:
        if why := address_problem(host, str(sockaddr[0]), policy):
            raise FetchError(f"refused to connect: {why} (the egress rule; list it in allow_hosts)")
    last: OSError | None = None
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        sock.settimeout(timeout)
        try:
            sock.connect(sockaddr)
            return sock
        except OSError as err:
            sock.close()
            last = err
    raise last or OSError(f"no address for {host}")


def open_url(
    url: str, policy: HostPolicy, method: str = "GET", headers: dict[str, str] | None = None
) -> http.client.HTTPResponse:
    """The response to ``url`` after following at most ``MAX_REDIRECTS`` checked redirects."""
    for _ in range(MAX_REDIRECTS + 1):
        if why := url_problem(url, policy):
            raise FetchError(f"{url}: refused by the URL policy: {why}")
        parts = urlsplit(url)
        kind = _CheckedHTTPSConnection if parts.scheme == "https" else _CheckedHTTPConnection
        conn = kind(parts.hostname, parts.port, timeout=TIMEOUT_S)
        conn.policy = policy
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        conn.request(method, path, headers={"User-Agent": USER_AGENT, **(headers or {})})
        response = conn.getresponse()
        if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
            url = urljoin(url, response.getheader("Location"))
            response.close()
            conn.close()
            continue
        return response
    raise FetchError(f"{url}: more than {MAX_REDIRECTS} redirects")


def read_text(url: str, policy: HostPolicy, max_bytes: int = 64 << 20) -> str | None:
    """A small text file's content, or None on 404; FetchError otherwise."""
    response = open_url(url, policy)
    try:
        if response.status in (404, 410):
            return None
        if response.status != 200:
            raise FetchError(f"{url}: the server answered HTTP {response.status} {response.reason}")
        data = response.read(max_bytes + 1)
    finally:
        response.close()
    if len(data) > max_bytes:
        raise FetchError(f"{url}: larger than {max_bytes} bytes; not a list or checksum file")
    return data.decode("utf-8", "replace")


def describe(url: str, policy: HostPolicy, checksum: str = "auto") -> RemoteFile:
    """The publisher's sha256 (``checksum``: ``auto`` uses ``<url>.sha256`` when present, ``required``
    fails without it, ``none`` skips it) plus the server's ETag and size from a HEAD request."""
    sha = None
    if checksum != "none":
        text = read_text(url + ".sha256", policy)
        match = SHA256.match(text.strip()) if text else None
        if text is not None and not match:
            raise FetchError(f"{url}.sha256: not a sha256 checksum file (expected 64 hex digits first)")
        if match is None and checksum == "required":
            raise FetchError(f"{url}: no {url}.sha256 beside it, and the spec says checksum: required")
        sha = match.group(1).lower() if match else None
    response = open_url(url, policy, method="HEAD")
    response.close()
    if response.status in (404, 410):
        return RemoteFile(url, sha, None, None)
    length = response.getheader("Content-Length")
    return RemoteFile(url, sha, response.getheader("ETag"), int(length) if length else None)


def cache_path(cache_dir: Path, remote: RemoteFile) -> Path:
    """Where ``remote`` is kept: ``<cache>/<hash of URL and description>/<file name>``."""
    name = os.path.basename(urlsplit(remote.url).path) or "index"
    return cache_dir / hash_json(remote.fingerprint()) / name


def _cached(final: Path, remote: RemoteFile) -> bool:
    marker = final.with_name(final.name + ".done.json")
    if not (final.is_file() and marker.is_file()):
        return False
    done = read_json(marker)
    return final.stat().st_size == done.get("size") and (remote.sha256 in (None, done.get("sha256")))


def fetch(
    remote: RemoteFile, cache_dir: Path, policy: HostPolicy, retries: int = 5, backoff_s: float = 0.5
) -> Path:
    """The local copy of ``remote`` (downloaded, resumed or reused); RemoteMissing on 404."""
    final = cache_path(cache_dir, remote)
    if _cached(final, remote):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    part = final.with_name(final.name + ".part")
    problem = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        try:
            if _download(remote, part, policy):
                break
            problem = "the connection closed before the end of the file"
        except RemoteMissing:
            part.unlink(missing_ok=True)
            raise
        except (OSError, http.client.HTTPException, _Transient) as err:
            problem = f"{type(err).__name__}: {err}"
        log.info("%s: try %d of %d stopped (%s); resuming", remote.url, attempt + 1, retries + 1, problem)
    else:
        have = part.stat().st_size if part.exists() else 0
        raise FetchError(
            f"{remote.url}: download failed after {retries + 1} tries ({problem}); {have} bytes are kept "
            "and a rerun resumes from there"
        )
    digest = _sha256(part)
    if remote.sha256 and digest != remote.sha256:
        part.unlink(missing_ok=True)
        raise FetchError(
            f"{remote.url}: the download's sha256 is {digest}, the publisher's {remote.url}.sha256 says "
            f"{remote.sha256}; the download was deleted and nothing from it is kept. Rerun to download "
            "it again; if it fails again, the file or its checksum changed upstream"
        )
    os.replace(part, final)
    marker = {"size": final.stat().st_size, "sha256": digest}
    atomic_write_json(final.with_name(final.name + ".done.json"), marker)
    return final


class _Transient(Exception):
    """A server answer worth retrying (5xx, 429)."""


def _download(remote: RemoteFile, part: Path, policy: HostPolicy) -> bool:
    """Continue ``part`` from its size; True when the file is complete."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    if have and remote.etag:
        headers["If-Range"] = remote.etag
    response = open_url(remote.url, policy, headers=headers)
    try:
        if response.status in (404, 410):
            raise RemoteMissing(f"{remote.url}: the server answered HTTP {response.status} (not there)")
        if response.status == 416 and remote.size is not None and have == remote.size:
            return True
        if response.status in (429, 500, 502, 503, 504):
            raise _Transient(f"HTTP {response.status} {response.reason}")
        if response.status == 206:
            mode = "ab"
        elif response.status == 200:
            mode, have = "wb", 0  # the server sent the whole file (no range support, or it changed)
        else:
            raise FetchError(f"{remote.url}: the server answered HTTP {response.status} {response.reason}")
        length = response.getheader("Content-Length")
        expected = have + int(length) if length else remote.size
        with open(part, mode) as out:
            while block := response.read(CHUNK):
                out.write(block)
    finally:
        response.close()
    size = part.stat().st_size
    return expected is None or size >= expected


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()
