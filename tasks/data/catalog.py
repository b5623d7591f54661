"""DuckDB catalog of datasets, builds, shards, per-source counts and rejects (``catalog.duckdb``).

The catalog is derived from build manifests (the manifest is the source of truth), so recording a
build twice replaces its rows instead of duplicating them. Queries from the CLI open the file
read-only. ``missing_shards`` lists rows whose shard file is gone or has another size; the
``build-data`` flow checks them first, repairs the build and rewrites (or, for a build no longer on
disk, removes) those rows.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS datasets (
    name VARCHAR PRIMARY KEY, kind VARCHAR, profile VARCHAR, license VARCHAR, spec_path VARCHAR,
    description VARCHAR, latest_build VARCHAR, updated_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS builds (
    build_id VARCHAR PRIMARY KEY, name VARCHAR, kind VARCHAR, path VARCHAR, code_version VARCHAR,
    tokenizer_hash VARCHAR, samples BIGINT, tokens BIGINT, bytes BIGINT, rejected BIGINT, read BIGINT,
    shards INTEGER, recorded_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS shards (
    build_id VARCHAR, path VARCHAR, split VARCHAR, subset VARCHAR, sha256 VARCHAR, samples BIGINT,
    tokens BIGINT, bytes BIGINT, PRIMARY KEY (build_id, path));
CREATE TABLE IF NOT EXISTS source_counts (
    build_id VARCHAR, subset VARCHAR, weight DOUBLE, read BIGINT, kept BIGINT, rejected BIGINT,
    tokens BIGINT, counts_json VARCHAR, PRIMARY KEY (build_id, subset));
CREATE TABLE IF NOT EXISTS rejects (
    build_id VARCHAR, reason VARCHAR, count BIGINT, PRIMARY KEY (build_id, reason));
"""


@contextlib.contextmanager
def connect(path: str | Path, read_only: bool = False) -> Iterator[Any]:
    """A DuckDB connection to the catalog (created with its schema unless read-only)."""
    import duckdb

    path = Path(path)
    if read_only and not path.exists():
        raise FileNotFoundError(f"no catalog at {path}; build a dataset first (`mvlm data build`)")
    path.parent.mkdir(parents=True, exist_ok=True)
    con = _open(duckdb, path, read_only)
    try:
        if not read_only:
            con.execute(SCHEMA)
        yield con
    finally:
        con.close()


def _open(duckdb: Any, path: Path, read_only: bool, timeout_s: float = 60.0) -> Any:
    """Open, retrying while another process holds the file (DuckDB allows one writer process, and a
    long ``mvlm data sql`` holds it as long as it runs); the error after ``timeout_s`` says so."""
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except duckdb.IOException as err:
            if time.monotonic() > deadline:
                raise duckdb.IOException(
                    f"{path}: still locked by another process after {timeout_s:.0f}s ({err}); "
                    "wait for the other build or query to finish"
                ) from err
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


def record_build(catalog: str | Path, manifest: dict[str, Any], build_path: Path, spec_path: str) -> None:
    """Insert or replace every row describing one build."""
    from tasks.core import faults

    faults.hit("catalog-write")
    build_id, spec, stats = manifest["build_id"], manifest["spec"], manifest["stats"]
    totals = stats["totals"]
    shards = manifest["shards"]
    with connect(catalog) as con:
        con.execute("BEGIN")
        for table in ("builds", "shards", "source_counts", "rejects"):
            con.execute(f"DELETE FROM {table} WHERE build_id = ?", [build_id])
        con.execute(
            "INSERT OR REPLACE INTO datasets VALUES (?, ?, ?, ?, ?, ?, ?, now())",
            [manifest["name"], manifest["kind"], manifest["profile"], spec["license"], spec_path,
             spec.get("description", ""), build_id],
        )  # fmt: skip
        con.execute(
            "INSERT INTO builds VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now())",
            [build_id, manifest["name"], manifest["kind"], str(build_path), manifest["code_version"],
             (manifest.get("tokenizer") or {}).get("hash"), sum(s["samples"] for s in shards),
             sum(s["tokens"] for s in shards), sum(s["bytes"] for s in shards), totals.get("rejected", 0),
             totals.get("read", 0), len(shards)],
        )  # fmt: skip
        fields = ("path", "split", "subset", "sha256", "samples", "tokens", "bytes")
        _insert_many(
            con,
            "INSERT INTO shards VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [[build_id, *(s[f] for f in fields)] for s in shards],
        )
        weights = manifest.get("weights", {})
        _insert_many(
            con,
            "INSERT INTO source_counts VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [[build_id, sub, weights.get(sub), c.get("read", 0), c.get("kept", 0), c.get("rejected", 0),
              c.get("tokens", 0), json.dumps(c, sort_keys=True)] for sub, c in stats["subsets"].items()],
        )  # fmt: skip
        _insert_many(
            con,
            "INSERT INTO rejects VALUES (?, ?, ?)",
            [[build_id, r, n] for r, n in stats["rejects"].items()],
        )
        con.execute("COMMIT")


def _insert_many(con: Any, sql: str, rows: list[list[Any]]) -> None:
    """executemany that accepts an empty list (DuckDB refuses one)."""
    if rows:
        con.executemany(sql, rows)


def query(catalog: str | Path, sql: str, params: list[Any] | None = None) -> tuple[list[str], list[tuple]]:
    """Run a read-only query; returns (column names, rows)."""
    import duckdb

    with connect(catalog, read_only=True) as con:
        try:
            cursor = con.execute(sql, params or [])
        except duckdb.Error as err:
            raise ValueError(f"query failed: {err}") from err
        columns = [d[0] for d in cursor.description] if cursor.description else []
        return columns, cursor.fetchall()


def latest_build(catalog: str | Path, name: str) -> dict[str, Any] | None:
    """The latest recorded build of dataset ``name`` as a dict, or None."""
    if not Path(catalog).exists():
        return None
    cols, rows = query(
        catalog,
        "SELECT b.* FROM builds b JOIN datasets d ON d.latest_build = b.build_id WHERE d.name = ?",
        [name],
    )
    return dict(zip(cols, rows[0], strict=True)) if rows else None


def missing_shards(catalog: str | Path, name: str) -> list[dict[str, Any]]:
    """Shard rows of dataset ``name`` whose file is gone or has another size than recorded:
    ``{"build_id", "shard", "reason"}`` each (an empty list when there is no catalog yet)."""
    if not Path(catalog).exists():
        return []
    _, rows = query(
        catalog,
        "SELECT b.build_id, b.path, s.path, s.bytes FROM builds b JOIN shards s ON s.build_id = b.build_id "
        "WHERE b.name = ? ORDER BY b.build_id, s.path",
        [name],
    )
    out = []
    for build_id, build_path, shard, size in rows:
        file = Path(build_path) / shard
        if not file.is_file():
            reason = "missing"
        elif (have := file.stat().st_size) != size:
            reason = f"size mismatch ({have} bytes, recorded {size})"
        else:
            continue
        out.append({"build_id": build_id, "shard": shard, "reason": reason})
    return out


def forget_build(catalog: str | Path, build_id: str) -> None:
    """Delete every row of one build (whose files are gone); a dataset naming it as latest names none."""
    with connect(catalog) as con:
        con.execute("BEGIN")
        for table in ("builds", "shards", "source_counts", "rejects"):
            con.execute(f"DELETE FROM {table} WHERE build_id = ?", [build_id])
        con.execute("UPDATE datasets SET latest_build = NULL WHERE latest_build = ?", [build_id])
        con.execute("COMMIT")
