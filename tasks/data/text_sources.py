"""Reading a text build's sources: files (jsonl, json, parquet), fetched remote files and hub
datasets, one unit at a time, as normalised documents; a record that cannot be a document comes back
with a reject reason (``Doc.text`` is None) instead of being dropped."""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from tasks.data.bounded_read import bounded_lines, line_limit, load_whole_json, oversized_detail
from tasks.data.builder import BuildContext, BuildError, Unit, expand_files
from tasks.data.hub import read_revision
from tasks.data.specs import FilesSource, Filters, HFSource, RemoteFilesSource, resolve_env

_CONTROL = {c: None for c in range(32) if c not in (9, 10)} | {0x7F: None}
SURROGATE = re.compile("[\ud800-\udfff]")
"""A lone surrogate (JSON allows ``\\ud800``; UTF-8 cannot encode it)."""


@dataclass
class Doc:
    """A document read from a source (text is None when it was rejected on reading)."""

    where: str
    """Line number or row index inside the source."""
    text: str | None
    """Normalised text, or None."""
    reason: str = ""
    """Reject reason when ``text`` is None."""
    detail: str = ""
    """Explanation of the reject."""
    raw: str = ""
    """Excerpt of the raw input for the rejects file."""


def plan_units(ctx: BuildContext) -> list[Unit]:
    """One unit per source file (or hub shard), in spec order."""
    units: list[Unit] = []
    for sub in ctx.spec.subsets:
        src = sub.source
        if isinstance(src, HFSource):
            for shard in range(_hf_num_shards(src, read_revision(ctx.source.get(sub.name), src))):
                units.append(Unit(len(units), sub.name, f"hf:{shard}"))
        elif isinstance(src, FilesSource):
            for path in expand_files(ctx.data_root, src.paths):
                units.append(Unit(len(units), sub.name, path))
        elif isinstance(src, RemoteFilesSource):  # the files described at plan time, in list order
            for described in ctx.source[sub.name]["files"]:
                units.append(Unit(len(units), sub.name, described["url"]))
    return units


def normalise(text: str) -> str:
    """NFC, LF line ends, no control characters (but tab and newline), stripped."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    return text.translate(_CONTROL).strip()


def read_docs(unit: Unit, ctx: BuildContext) -> Iterator[Doc]:
    """Documents of one unit, normalised and filtered; bad ones come back with a reason."""
    sub = next(s for s in ctx.spec.subsets if s.name == unit.subset)
    src = sub.source
    limits = ctx.spec.filters
    if isinstance(src, HFSource):
        raw_docs = _read_hf(src, unit, read_revision(ctx.source.get(unit.subset), src))
    elif isinstance(src, RemoteFilesSource):
        raw_docs = _read_remote(unit, ctx, src)
    else:
        raw_docs = _read_file(unit.source, src, limits)
    for doc in raw_docs:
        if doc.text is None:
            yield doc
            continue
        if len(doc.text) > limits.max_chars:
            yield Doc(doc.where, None, "too_long", f"{len(doc.text)} chars > max_chars {limits.max_chars}")
            continue
        text = normalise(doc.text)
        if not text:
            yield Doc(doc.where, None, "empty", "empty after normalisation", doc.text[:80])
        elif len(text) < limits.min_chars:
            yield Doc(doc.where, None, "too_short", f"{len(text)} chars < min_chars {limits.min_chars}", text)
        else:
            yield Doc(doc.where, text)


def _read_file(path: str, src: FilesSource, limits: Filters) -> Iterator[Doc]:
    if src.format == "jsonl":
        yield from _read_jsonl(path, src.text_field, line_limit(limits, limits.max_chars))
    elif src.format == "json":
        rows = load_whole_json(path, limits, "JSON file")
        if not isinstance(rows, list):
            raise BuildError(f"{path}: expected a JSON list of records, got {type(rows).__name__}")
        for i, row in enumerate(rows):
            yield _doc_from_row(f"record {i}", row, src.text_field)
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(path, columns=[src.text_field])
        for i, value in enumerate(table.column(0).to_pylist()):
            yield _doc_from_row(f"row {i}", {src.text_field: value}, src.text_field)


def _read_remote(unit: Unit, ctx: BuildContext, src: RemoteFilesSource) -> Iterator[Doc]:
    """The records of one fetched file; a file the server does not have is one ``http_404`` reject."""
    from tasks.data.remote_files import FetchError, RemoteMissing
    from tasks.data.remote_text import fetch_unit

    try:
        path = fetch_unit(ctx.spec, ctx.source[unit.subset], unit.source, ctx.data_root, src.retries)
    except RemoteMissing as err:
        yield Doc("file", None, "http_404", f"{err}; its documents are missing from this build", unit.source)
        return
    except FetchError as err:
        raise BuildError(f"spec {ctx.spec.name}: subset {unit.subset}: {err}") from None
    yield from _read_jsonl(
        str(path), src.text_field, line_limit(ctx.spec.filters, ctx.spec.filters.max_chars)
    )


def _read_jsonl(path: str, field: str, max_line_bytes: int) -> Iterator[Doc]:
    """Records of a jsonl file (``.gz`` and ``.zst`` decompressed while reading); no line is read past
    ``max_line_bytes`` (longer ones: ``oversized_line``). A UTF-8 BOM on line 1 and CRLF line ends are
    accepted; blank lines are not records."""
    from tasks.data.remote_text import open_records

    with open_records(path) as handle:
        for line in bounded_lines(handle, max_line_bytes):
            where = f"line {line.number}"
            if line.data is None:
                detail = oversized_detail(line, max_line_bytes, "max_chars")
                yield Doc(where, None, "oversized_line", detail, line.head[:80].decode("utf-8", "replace"))
                continue
            raw = line.data
            if not raw.strip():
                continue
            try:  # the fast parser takes well-formed lines; anything it refuses goes the careful way
                yield _doc_from_row(where, orjson.loads(raw), field)
                continue
            except orjson.JSONDecodeError:
                pass
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield Doc(where, None, "invalid_utf8", str(err), raw[:80].decode("utf-8", "replace"))
                continue
            try:
                row = json.loads(text)
            except (ValueError, RecursionError) as err:  # also too deep, or an int over Python's digit limit
                yield Doc(where, None, "invalid_json", f"{type(err).__name__}: {err}"[:200], text[:80])
                continue
            yield _doc_from_row(where, row, field)


def _doc_from_row(where: str, row: Any, field: str) -> Doc:
    if not isinstance(row, dict):
        return Doc(
            where, None, "not_an_object", f"expected a JSON object, got {type(row).__name__}", str(row)[:80]
        )
    if field not in row:
        return Doc(where, None, "missing_field", f"no {field!r} field (has {sorted(row)[:8]})", str(row)[:80])
    value = row[field]
    if not isinstance(value, str):
        return Doc(
            where, None, "bad_type", f"{field!r} is {type(value).__name__}, not a string", str(value)[:80]
        )
    if bad := SURROGATE.search(value):
        detail = f"lone surrogate U+{ord(bad.group()):04X} at offset {bad.start()} (not encodable as UTF-8)"
        return Doc(where, None, "invalid_unicode", detail, value[:80])
    return Doc(where, value)


def _hf_dataset(src: HFSource, revision: str | None):
    import datasets

    token = resolve_env(src.token)
    return datasets.load_dataset(
        src.dataset, src.config, split=src.split, revision=revision, streaming=True, token=token
    )


def _hf_num_shards(src: HFSource, revision: str | None) -> int:
    return max(1, _hf_dataset(src, revision).num_shards)


def _read_hf(src: HFSource, unit: Unit, revision: str | None) -> Iterator[Doc]:
    """Rows of one shard of a hub dataset, read at ``revision`` (the commit resolved at plan time)."""
    dataset = _hf_dataset(src, revision)
    shard = int(unit.source.split(":", 1)[1])
    part = dataset.shard(num_shards=dataset.num_shards, index=shard) if dataset.num_shards > 1 else dataset
    for i, row in enumerate(part):
        yield _doc_from_row(f"row {i}", row, src.text_field)
