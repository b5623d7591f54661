"""``remote_files`` text sources: list the URLs, describe them at plan time, fetch one per unit.

At plan time (``remote_fingerprint``) the URL list is read (a ``urls.txt`` or the spec's inline
list, filtered by ``include``), every URL is checked against the URL policy and described (the
publisher's sha256 or the server's ETag and size, on a few threads): that description is the
subset's part of the build identity and is kept in the build context. A unit is one file: the
worker fetches exactly the described file into ``<data root>/cache/remote/`` and the text builder
streams it (``.gz`` and ``.zst`` decompressed on the fly).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any
from urllib.parse import urljoin

from tasks.data.builder import BuildError
from tasks.data.remote_files import FetchError, RemoteFile, describe, fetch, read_text
from tasks.data.specs import DatasetSpec, RemoteFilesSource
from tasks.data.url_policy import HostPolicy, url_problem

DESCRIBE_THREADS = 16
CACHE = Path("cache") / "remote"
"""Where fetched files are kept, under the data root."""


class RemoteSourceError(BuildError):
    """A remote source that cannot be planned; the message names the spec, the URL and what to do."""


def _policy(spec: DatasetSpec) -> HostPolicy:
    return HostPolicy.from_allow(spec.allow_hosts)


def list_urls(
    spec: DatasetSpec, src: RemoteFilesSource, data_root: str | Path
) -> tuple[list[str], str | None]:
    """(the URLs of a source in list order, sha256 of the list file or None for an inline list)."""
    policy = _policy(spec)
    digest = None
    if src.listing is None:
        lines, base = list(src.urls), ""
    else:
        if "://" in src.listing:
            try:
                text = read_text(src.listing, policy)
            except (FetchError, OSError) as err:
                raise RemoteSourceError(
                    f"spec {spec.name}: cannot read the URL list {src.listing}: {err}"
                ) from err
            if text is None:
                raise RemoteSourceError(
                    f"spec {spec.name}: the URL list {src.listing} is not there (HTTP 404)"
                )
            base = src.listing
        else:
            path = src.listing if os.path.isabs(src.listing) else os.path.join(data_root, src.listing)
            try:
                text = Path(path).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as err:
                raise RemoteSourceError(f"spec {spec.name}: cannot read the URL list {path} ({err})") from err
            base = ""
        digest = hashlib.sha256(text.encode()).hexdigest()
        lines = text.splitlines()
    urls = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        url = urljoin(base, line) if base else line
        if src.include is None or re.search(src.include, url):
            urls.append(url)
    if not urls:
        what = f" matching include {src.include!r}" if src.include else ""
        raise RemoteSourceError(f"spec {spec.name}: no URL{what} in {src.listing or 'the inline urls'}")
    refused = [(u, why) for u in urls if (why := url_problem(u, policy))]
    if refused:
        url, why = refused[0]
        raise RemoteSourceError(
            f"spec {spec.name}: {len(refused)} URL(s) of {src.listing or 'urls'} refused by the URL policy, "
            f"e.g. {url}: {why}"
        )
    return urls, digest


def remote_fingerprint(spec: DatasetSpec, src: RemoteFilesSource, data_root: str | Path) -> dict[str, Any]:
    """``{"list_sha256", "files": [{url, sha256, etag, size}]}``: what every file holds now."""
    urls, digest = list_urls(spec, src, data_root)
    policy = _policy(spec)

    def one(url: str) -> dict[str, Any]:
        try:
            return asdict(describe(url, policy, src.checksum))
        except (FetchError, OSError) as err:
            raise RemoteSourceError(f"spec {spec.name}: cannot describe {url}: {err}") from err

    with ThreadPoolExecutor(max_workers=min(DESCRIBE_THREADS, len(urls))) as pool:
        files = list(pool.map(one, urls))
    return {"list_sha256": digest, "files": files}


def fetch_unit(
    spec: DatasetSpec, source: dict[str, Any], url: str, data_root: str | Path, retries: int
) -> Path:
    """The local copy of one described file (RemoteMissing when the server says 404)."""
    described = next((f for f in source["files"] if f["url"] == url), None)
    if described is None:
        raise RemoteSourceError(f"spec {spec.name}: {url} was not described at plan time")
    return fetch(RemoteFile(**described), Path(data_root) / CACHE, _policy(spec), retries=retries)


@contextlib.contextmanager
def open_records(path: str | Path) -> Iterator[IO[bytes]]:
    """A binary stream of a file's records: ``.gz`` and ``.zst`` decompressed while reading."""
    name = str(path).lower()
    if name.endswith(".gz"):
        with gzip.open(path, "rb") as handle:
            yield handle
    elif name.endswith(".zst"):
        import zstandard

        with open(path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as reader:
            yield io.BufferedReader(reader)  # the reader has no readline
    else:
        with open(path, "rb") as handle:
            yield handle
