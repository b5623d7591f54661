"""``mvlm data ...``: dataset specs, sample data, builds, catalog queries."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from flows.logs import console, report_failure

data_app = typer.Typer(help="Dataset specs, shard builds and the DuckDB catalog.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Attach the ``data`` command group to the root app."""
    app.add_typer(data_app, name="data")


def _data_root(data_root: Path | None) -> Path:
    from tasks.core.settings import get_settings

    return data_root or get_settings().data_root


DataRoot = Annotated[
    Path | None, typer.Option(help="Data root (default: $MVLM_DATA_ROOT or ./work_dir/data).")
]


@data_app.command("validate")
def validate(
    files: Annotated[list[Path] | None, typer.Argument(help="Spec files (default: all).")] = None,
) -> None:
    """Validate spec files; every error names file, line, field and the allowed values."""
    from tasks.data.specs import SpecError, load_spec, spec_files

    problems: list[str] = []
    targets = files or spec_files()
    for file in targets:
        try:
            spec = load_spec(file)
            console.print(f"[green]ok[/green] {file} ({spec.name}, {spec.kind}, {spec.profile})")
        except SpecError as err:
            problems.extend(err.problems)
    for problem in problems:
        console.print(f"[red]error[/red] {problem}", highlight=False)
    if problems:
        raise typer.Exit(1)
    console.print(f"{len(targets)} spec(s) valid")


@data_app.command("list")
def list_specs(data_root: DataRoot = None) -> None:
    """Specs with their kind, profile and latest build."""
    from tasks.data.catalog import latest_build
    from tasks.data.specs import load_all

    catalog = _data_root(data_root) / "catalog.duckdb"
    table = Table("name", "kind", "profile", "subsets", "latest build", "samples", "tokens", "rejected")
    for name, (_, spec) in load_all().items():
        build = latest_build(catalog, name) or {}
        table.add_row(
            name, spec.kind, spec.profile, str(len(spec.subsets)), build.get("build_id", "-"),
            f"{build['samples']:,}" if build else "-", f"{build['tokens']:,}" if build else "-",
            f"{build['rejected']:,}" if build else "-",
        )  # fmt: skip
    console.print(table)


@data_app.command("make-samples")
def make_samples_cmd(
    out_dir: Annotated[Path | None, typer.Argument(help="Folder (default: <data root>/samples).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    data_root: DataRoot = None,
) -> None:
    """Generate the tiny profile's sample data and tokenizer (deterministic for a seed)."""
    from tasks.testkit.sample_tree import make_samples
    from tasks.testkit.samples import SampleConfig

    target = out_dir or _data_root(data_root) / "samples"
    summary = make_samples(target, SampleConfig(seed=seed))
    console.print(
        f"samples in {target}: {summary.n_images} images, tokenizer vocab {summary.tokenizer_vocab_size}"
    )


@data_app.command("build")
def build(
    names: Annotated[list[str] | None, typer.Argument(help="Spec names (default: all of --profile).")] = None,
    profile: Annotated[
        str | None, typer.Option(help="Build every spec of this profile (tiny, real).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if a verified build exists.")] = False,
    verify_all: Annotated[
        bool, typer.Option(help="Hash every shard of a reused build, not only changed ones.")
    ] = False,
    data_root: DataRoot = None,
) -> None:
    """Build dataset specs into verified webdataset shards (one Prefect flow run per spec)."""
    from flows.data import build_data, specs_for
    from tasks.data.build import BuildError

    root = _data_root(data_root)
    try:
        targets = specs_for(names or [], profile)
    except (KeyError, ValueError) as err:
        console.print(f"[red]error:[/red] {err.args[0]}")
        raise typer.Exit(2) from err
    table = Table("spec", "build", "status", "read", "kept", "rejected", "shards", title="dataset builds")
    failed = False
    for name in targets:
        try:
            s = build_data(name, force=force, data_root=str(root), verify_all=verify_all)
        except BuildError as err:
            report_failure(err)
            failed = True
            continue
        t = s["totals"]
        table.add_row(
            s["name"], s["build_id"], _status(s), str(t.get("read", 0)),
            str(t.get("kept", 0)), str(t.get("rejected", 0)), str(s["shards"]),
        )  # fmt: skip
    if table.row_count:
        console.print(table)
    if failed:
        raise typer.Exit(1)


def _status(summary: dict) -> str:
    """``reused``, ``built`` or ``repaired (N shards)`` for the build table."""
    if summary.get("repaired"):
        return f"repaired ({len(summary['repaired'])} shards)"
    return "reused" if summary["reused"] else "built"


@data_app.command("stats")
def stats(name: str, data_root: DataRoot = None) -> None:
    """Per-source counts, rejects by reason and shards of a dataset's latest build."""
    from tasks.data.catalog import latest_build, query

    catalog = _data_root(data_root) / "catalog.duckdb"
    build = latest_build(catalog, name)
    if build is None:
        console.print(f"[red]error:[/red] no build of {name!r} in {catalog}; run `mvlm data build {name}`")
        raise typer.Exit(1)
    console.print(f"{name} build {build['build_id']} at {build['path']}")
    for title, sql in (
        ("per source", "SELECT subset, weight, read, kept, rejected, tokens FROM source_counts "
         "WHERE build_id = ?"),
        ("rejects", "SELECT reason, count FROM rejects WHERE build_id = ? ORDER BY count DESC"),
        ("splits", "SELECT split, count(*) AS shards, sum(samples) AS samples, sum(tokens) AS tokens, "
         "sum(bytes) AS bytes FROM shards WHERE build_id = ? GROUP BY split ORDER BY split"),
    ):  # fmt: skip
        columns, rows = query(catalog, sql, [build["build_id"]])
        console.print(_table(title, columns, rows))


@data_app.command("sql")
def sql(
    query_text: Annotated[str, typer.Argument(help="A read-only SQL query.")], data_root: DataRoot = None
) -> None:
    """Run a read-only SQL query against the catalog."""
    from tasks.data.catalog import query

    try:
        columns, rows = query(_data_root(data_root) / "catalog.duckdb", query_text)
    except (ValueError, FileNotFoundError) as err:
        console.print(f"[red]error:[/red] {err}", highlight=False)
        raise typer.Exit(1) from err
    console.print(_table(None, columns, rows))


def _table(title: str | None, columns: list[str], rows: list[tuple]) -> Table:
    table = Table(*columns, title=title)
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    return table
