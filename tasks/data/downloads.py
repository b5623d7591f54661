"""A spec's ``downloads``: published files and archives fetched into the data root before a build.

Each entry is fetched through ``tasks.data.remote_files`` (URL policy at every hop, resume, retries, the
publisher's or the spec's sha256) into ``<data root>/cache/remote/``, then put at its ``to`` path or
unpacked into it. Unpacking refuses members that would leave the folder (absolute paths, ``..``),
links and devices, and writes each file atomically; a marker written last (``<to>.download.json``
for a file, ``<to>/.mvlm-download-<url hash>.json`` for a folder) records the URL and the archive's sha256, so
a rerun skips a finished entry and a changed URL or checksum redoes it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from tasks.core.identity import atomic_write_json, read_json, sha256_file
from tasks.data.builder import BuildError
from tasks.data.remote_files import FetchError, RemoteFile, describe, fetch
from tasks.data.remote_text import CACHE
from tasks.data.specs import DatasetSpec, Download
from tasks.data.url_policy import HostPolicy

log = logging.getLogger(__name__)


def marker_path(data_root: str | Path, item: Download) -> Path:
    """Where the marker of a finished download lives."""
    target = Path(data_root) / item.to
    return (
        target / ".mvlm-download.json"
        if item.unpack != "none"
        else target.with_name(target.name + ".download.json")
    )


def ensure_downloads(spec: DatasetSpec, data_root: str | Path) -> list[Path]:
    """Fetch (or reuse) every download of ``spec``; returns their targets. BuildError names the entry."""
    policy = HostPolicy.from_allow(spec.allow_hosts)
    done = []
    for number, item in enumerate(spec.downloads):
        try:
            done.append(_ensure(item, Path(data_root), policy))
        except (BuildError, FetchError, OSError, zipfile.BadZipFile, tarfile.TarError) as err:
            raise BuildError(f"spec {spec.name}: downloads[{number}] ({item.url}): {err}") from err
    return done


def _ensure(item: Download, data_root: Path, policy: HostPolicy) -> Path:
    target = data_root / item.to
    marker = marker_path(data_root, item)
    if marker.is_file():
        seen = read_json(marker)
        if seen.get("url") == item.url and item.sha256 in (None, seen.get("sha256")) and target.exists():
            return target
    remote = describe(item.url, policy, "none" if item.sha256 else "auto")
    if item.sha256:
        remote = RemoteFile(remote.url, item.sha256, remote.etag, remote.size)
    local = fetch(remote, data_root / CACHE, policy)
    digest = remote.sha256 or sha256_file(local)
    log.info("%s: fetched; %s into %s", item.url, "unpacking" if item.unpack != "none" else "placing", target)
    if item.unpack == "zip":
        _unzip(local, target)
    elif item.unpack == "tar":
        _untar(local, target)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        shutil.copyfile(local, temp)
        os.replace(temp, target)
    atomic_write_json(marker, {"url": item.url, "sha256": digest})
    return target


def _member_path(root: Path, name: str, archive: Path) -> Path:
    """The path a member may be written to; BuildError for one that would leave ``root``."""
    parts = PurePosixPath(name.replace("\\", "/"))
    if parts.is_absolute() or ".." in parts.parts or (parts.parts and ":" in parts.parts[0]):
        raise BuildError(f"{archive.name}: member {name!r} would be written outside {root}; archive refused")
    return root / parts


def _write_member(path: Path, source) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temp, "wb") as out:
        shutil.copyfileobj(source, out, 1 << 20)
    os.replace(temp, path)


def _unzip(archive: Path, root: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        for info in infos:  # check every member before writing any
            _member_path(root, info.filename, archive)
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise BuildError(
                    f"{archive.name}: member {info.filename!r} is a symbolic link; archive refused"
                )
        for info in infos:
            if not info.is_dir():
                with zf.open(info) as source:
                    _write_member(_member_path(root, info.filename, archive), source)


def _untar(archive: Path, root: Path) -> None:
    with tarfile.open(archive) as tf:
        members = tf.getmembers()
        for member in members:
            _member_path(root, member.name, archive)
            if not (member.isfile() or member.isdir()):
                raise BuildError(
                    f"{archive.name}: member {member.name!r} is a link or device; archive refused"
                )
        for member in members:
            if member.isfile():
                source = tf.extractfile(member)
                assert source is not None
                _write_member(_member_path(root, member.name, archive), source)
