"""Reads with a bound: no source line or whole-JSON file is read into memory past the spec's limits.

``bounded_lines`` reads a line-oriented file (jsonl, TSV) with at most ``limit + 2`` bytes of any line
in memory: a longer line comes back as oversized (its first bytes kept for the rejects file) and the
rest of it is skipped in 64 KiB chunks up to the next newline. ``load_whole_json`` refuses a file
above ``filters.max_json_bytes`` before reading it, with an error naming the file and the field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from tasks.data.specs import Filters

MAX_BYTES_PER_CHAR = 12
"""Bytes one character can take in a JSON line: an escaped astral character is ``\\ud83d\\ude00``."""
LINE_SLACK_BYTES = 1 << 20
"""Room in the default line limit for a record's other fields (ids, URLs, metadata)."""
SKIP_CHUNK = 1 << 16
"""Bytes read at a time while skipping the rest of an oversized line."""
HEAD_BYTES = 300
"""Bytes of an oversized line kept as the reject excerpt."""
BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Line:
    """One line of a file, read with a bound."""

    number: int
    """1-based physical line number."""
    data: bytes | None
    """The line without its ``\\n`` / ``\\r\\n`` end (and without a UTF-8 BOM on line 1); None when the
    line is longer than the limit."""
    size: int
    """Bytes in the line without its end (for an oversized line: all of them, counted while skipping)."""
    head: bytes
    """The first bytes of the line (the reject excerpt)."""


def line_limit(filters: Filters, chars: int) -> int:
    """The line bound in bytes: ``filters.max_line_bytes``, else 12 x ``chars`` + 1 MiB."""
    if filters.max_line_bytes is not None:
        return filters.max_line_bytes
    return MAX_BYTES_PER_CHAR * chars + LINE_SLACK_BYTES


def oversized_detail(line: Line, limit: int, chars_field: str) -> str:
    """The reject detail of an oversized line: its size, the limit and the fields that set it."""
    return (
        f"line of {line.size} bytes > {limit} bytes (filters.max_line_bytes, default 12 x "
        f"filters.{chars_field} + 1 MiB); skipped without reading it whole"
    )


def bounded_lines(handle: IO[bytes], limit: int) -> Iterator[Line]:
    """Every line of a binary file; lines over ``limit`` bytes come back with ``data=None``."""
    number = 0
    while True:
        bound = limit + 2 + (len(BOM) if number == 0 else 0)  # the line, "\r\n", one byte more (and a BOM)
        chunk = handle.readline(bound)
        if not chunk:
            return
        number += 1
        complete = chunk.endswith(b"\n") or len(chunk) < bound
        if number == 1 and chunk.startswith(BOM):
            chunk = chunk[len(BOM) :]
        if not complete:
            size = len(chunk)
            while more := handle.readline(SKIP_CHUNK):
                if more.endswith(b"\n"):
                    size += len(more) - (2 if more.endswith(b"\r\n") else 1)
                    break
                size += len(more)
            yield Line(number, None, size, chunk[:HEAD_BYTES])
            continue
        if chunk.endswith(b"\n"):
            chunk = chunk[:-2] if chunk.endswith(b"\r\n") else chunk[:-1]
        if len(chunk) > limit:
            yield Line(number, None, len(chunk), chunk[:HEAD_BYTES])
        else:
            yield Line(number, chunk, len(chunk), chunk[:HEAD_BYTES])


def load_whole_json(path: str, filters: Filters, what: str = "JSON") -> Any:
    """A whole-JSON file (BOM tolerated), refused before reading when above ``filters.max_json_bytes``;
    BuildError names the file for a missing, oversized, non-UTF-8 or malformed file."""
    from tasks.data.builder import BuildError

    try:
        size = os.path.getsize(path)
    except OSError as err:
        raise BuildError(f"{path}: cannot read {what} ({err})") from err
    if size > filters.max_json_bytes:
        raise BuildError(
            f"{path}: {size} bytes is more than filters.max_json_bytes ({filters.max_json_bytes}); the "
            "file is one JSON document and would be loaded into memory whole: raise filters.max_json_bytes "
            "in the spec if this machine can hold it, or split the file"
        )
    try:
        with open(path, "rb") as handle:
            return json.loads(handle.read().decode("utf-8-sig"))
    except OSError as err:
        raise BuildError(f"{path}: cannot read {what} ({err})") from err
    except (ValueError, RecursionError) as err:  # bad UTF-8 or JSON, too deep, an int over the digit limit
        raise BuildError(
            f"{path}: not valid UTF-8 {what} ({type(err).__name__}: {err}); fix the file or the spec's path"
        ) from err
