"""Reading a URL list (TSV, CSV or parquet of url and caption) into rows, bounded: a row with the wrong
fields, invalid UTF-8 or an oversized line comes back with its problem, never a crash or an unbounded
read."""

from __future__ import annotations

import gzip
import logging
from dataclasses import dataclass
from typing import Any

from tasks.data.bounded_read import bounded_lines, line_limit, oversized_detail
from tasks.data.builder import (
    BuildError,
)
from tasks.data.specs import Filters, UrlListSource

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ListRow:
    """One row of a URL list."""

    where: str
    """``row N`` (0-based data row) or ``line N`` for rows that did not parse."""
    url: str | None
    """URL as written (may contain ``{LOCAL_SERVER}``)."""
    caption: str | None
    """Caption as written."""
    problem: str = ""
    """Parse problem of the row, if any."""
    reason: str = "invalid_row"
    """Reject reason when ``problem`` is set: ``invalid_row``, ``invalid_utf8`` or ``oversized_line``."""


def read_url_list(path: str, src: UrlListSource, filters: Filters | None = None) -> list[ListRow]:
    """Rows of a TSV (no quoting), CSV or parquet list; rows with the wrong number of fields, invalid
    UTF-8 or (TSV) more than ``filters.max_line_bytes`` come back with a problem. TSV lines are read with
    that bound, so one huge line never sits in memory whole."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    filters = filters or Filters()
    name = path.lower()
    if not name.endswith((".csv", ".csv.gz", ".parquet")):
        return _read_tsv(path, src, line_limit(filters, filters.max_caption_chars))
    bad: list[ListRow] = []
    if name.endswith(".parquet"):
        table = pq.read_table(path)
    else:

        def skip(row: Any) -> str:
            bad.append(
                ListRow(f"line {row.number}", None, None, f"{row.actual_columns} fields: {row.text[:200]}")
            )
            return "skip"

        parse = pacsv.ParseOptions(delimiter=",", quote_char='"', invalid_row_handler=skip)
        types = {src.url_col: pa.binary(), src.caption_col: pa.binary()}
        try:
            table = pacsv.read_csv(
                path,
                read_options=pacsv.ReadOptions(use_threads=False),
                parse_options=parse,
                convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=False),
            )
        except pa.ArrowInvalid as err:
            raise BuildError(f"{path}: cannot parse the CSV list ({err})") from err
    missing = [c for c in (src.url_col, src.caption_col) if c not in table.column_names]
    if missing:
        raise BuildError(f"{path}: column(s) {missing} not found; the list has {table.column_names}")
    urls = table.column(src.url_col).to_pylist()
    captions = table.column(src.caption_col).to_pylist()
    rows = []
    for i, (url, caption) in enumerate(zip(urls, captions, strict=True)):
        try:
            url, caption = (v.decode("utf-8") if isinstance(v, bytes) else v for v in (url, caption))
        except UnicodeDecodeError as err:
            bad.append(ListRow(f"row {i}", None, None, f"not UTF-8: {err}", "invalid_utf8"))
            continue
        rows.append(ListRow(f"row {i}", url, caption))
    return rows + bad


def _read_tsv(path: str, src: UrlListSource, limit: int) -> list[ListRow]:
    """A TSV list (``.gz`` too): header line, then ``url<TAB>caption`` lines; no line read past ``limit``
    bytes. Blank lines are skipped; ``row N`` counts the rows that parsed."""

    rows: list[ListRow] = []
    bad: list[ListRow] = []
    opener = gzip.open if path.lower().endswith(".gz") else open
    with opener(path, "rb") as handle:
        lines = bounded_lines(handle, limit)
        header = next(lines, None)
        if header is None or header.data is None:
            raise BuildError(f"{path}: no header line (or one over {limit} bytes) in the URL list")
        try:
            columns = header.data.decode("utf-8").split("\t")
        except UnicodeDecodeError as err:
            raise BuildError(f"{path}: the header line is not UTF-8 ({err})") from err
        missing = [c for c in (src.url_col, src.caption_col) if c not in columns]
        if missing:
            raise BuildError(f"{path}: column(s) {missing} not found; the list has {columns}")
        url_at, caption_at = columns.index(src.url_col), columns.index(src.caption_col)
        for line in lines:
            where = f"line {line.number}"
            if line.data is None:
                detail = oversized_detail(line, limit, "max_caption_chars")
                bad.append(ListRow(where, None, None, detail, "oversized_line"))
                continue
            if not line.data:
                continue
            try:
                text = line.data.decode("utf-8")
            except UnicodeDecodeError as err:
                excerpt = line.data[:200].decode("utf-8", "replace")
                bad.append(ListRow(where, None, None, f"not UTF-8 ({err}): {excerpt}", "invalid_utf8"))
                continue
            fields = text.split("\t")
            if len(fields) != len(columns):
                bad.append(ListRow(where, None, None, f"{len(fields)} fields: {text[:200]}"))
                continue
            rows.append(ListRow(f"row {len(rows)}", fields[url_at], fields[caption_at]))
    return rows + bad
