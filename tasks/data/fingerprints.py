"""What a build's identity is made of, besides its spec: how the sources look now (content hashes of
small files, size and mtime of big ones, hub and remote fingerprints), the tokenizer's hash, and the
versions of the libraries whose values decide what dedup and decontamination drop."""

from __future__ import annotations

import os
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

from tasks.core.identity import sha256_file
from tasks.data.builder import BuildError, expand_files, resolve_path
from tasks.data.specs import DatasetSpec, FilesSource, HFSource, LlavaSource, RemoteFilesSource, UrlListSource

SMALL_FILE = 256 << 20  # files up to this size are fingerprinted by content, larger by size + mtime


def file_fingerprint(path: str) -> dict[str, Any]:
    """Content hash for files up to SMALL_FILE bytes, size and mtime above; etag for URLs."""
    if "://" in path:
        import fsspec

        info = fsspec.filesystem(path.split("://")[0]).info(path)
        return {"path": path, "size": info.get("size"), "etag": info.get("ETag") or info.get("etag")}
    stat = os.stat(path)
    if stat.st_size <= SMALL_FILE:
        return {"path": os.path.basename(path), "size": stat.st_size, "sha256": sha256_file(path)}
    return {"path": os.path.basename(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def folder_fingerprint(folder: str) -> dict[str, Any]:
    """Number of files and total size under a folder (image roots)."""
    count = total = 0
    for root, _, names in os.walk(folder):
        for name in names:
            count += 1
            path = os.path.join(root, name)
            try:
                total += os.path.getsize(path)
            except OSError:  # a dangling link or a loop: the builder rejects the samples that use it
                total += os.lstat(path).st_size
    return {"files": count, "bytes": total}


def source_fingerprint(spec: DatasetSpec, data_root: str | Path) -> dict[str, Any]:
    """What the sources look like now, per subset (changes when the data changes)."""
    out: dict[str, Any] = {}
    for sub in spec.subsets:
        src = sub.source
        if isinstance(src, HFSource):
            from tasks.data.hub import hub_fingerprint

            out[sub.name] = hub_fingerprint(spec, src)
        elif isinstance(src, FilesSource):
            out[sub.name] = [file_fingerprint(f) for f in expand_files(data_root, src.paths)]
        elif isinstance(src, RemoteFilesSource):
            from tasks.data.remote_text import remote_fingerprint

            out[sub.name] = remote_fingerprint(spec, src, data_root)
        elif isinstance(src, UrlListSource):
            out[sub.name] = file_fingerprint(expand_files(data_root, [src.path])[0])
        elif isinstance(src, LlavaSource):
            entry = {"json": file_fingerprint(expand_files(data_root, [src.path])[0])}
            if src.image_root:
                entry["images"] = folder_fingerprint(resolve_path(data_root, src.image_root))
            out[sub.name] = entry
    return out


def resolve_tokenizer(spec: DatasetSpec, data_root: str | Path) -> tuple[str | None, str | None]:
    """(tokenizer folder or hub id, tokenizer hash) for specs that name one."""
    if spec.tokenizer is None:
        return None, None
    from model.tokenizer import load_tokenizer, tokenizer_hash

    local = resolve_path(data_root, spec.tokenizer)
    where = local if os.path.isdir(local) else spec.tokenizer
    try:
        return where, tokenizer_hash(load_tokenizer(where))
    except (OSError, ValueError) as err:
        raise BuildError(
            f"spec {spec.name}: tokenizer {spec.tokenizer!r} not found at {local} or on the hub ({err}); "
            "for the tiny profile run `mvlm data make-samples` first"
        ) from err


def signature_libraries(spec: DatasetSpec) -> dict[str, str]:
    """Versions of the libraries whose values decide what a spec's dedup or decontamination drops
    (rensa's MinHash, imagehash's phash): another version may find other copies, so another build."""
    names = ["rensa"] if spec.dedup.minhash is not None else []
    if spec.dedup.image is not None or spec.decontaminate is not None:
        names += ["imagehash", "pillow"]
    return {name: package_version(name) for name in names}
