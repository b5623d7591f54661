"""Prefect flow ``build-data``: validate, build (Ray fan-out inside), preview and catalog one spec.

Corruption found on the way is repaired and reported in the summary the flow returns (and as
WARNINGs): ``repaired`` (shards rebuilt, with the reason), ``cleaned`` (temp files of killed writes
deleted) and ``catalog_repaired`` (catalog rows that pointed at missing or wrong-sized shard files:
the build is repaired and its rows rewritten, or, for a build no longer on disk, its rows removed).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from tasks.data.build import BuildSummary
from tasks.data.specs import DatasetSpec


@task(name="validate-spec", cache_policy=NONE)
def validate_spec(name: str, spec_dir: str | None) -> str:
    """Path of the spec called ``name`` (every spec in the folder must validate)."""
    from tasks.data.specs import find_spec

    return str(find_spec(name, spec_dir)[0])


@task(name="build-dataset", cache_policy=NONE)
def build_dataset_task(spec_path: str, data_root: str, force: bool, verify_all: bool = False) -> BuildSummary:
    """Build or reuse the dataset (``verify_all``: hash every shard of a reused build); its summary."""
    from tasks.data.previews import token_chart
    from tasks.quality.eval_index import build_decontaminated

    result = build_decontaminated(spec_path, data_root, force=force, verify_all=verify_all)
    logger = get_run_logger()
    for item in result.repaired:
        logger.warning("%s: rebuilt shard %s (%s)", result.name, item["shard"], item["reason"])
    for path in result.cleaned:
        logger.warning("%s: deleted %s, left by an interrupted write", result.name, path)
    chart = result.path / "tokens.png"
    if not chart.exists():
        token_chart(result.manifest, chart)
    return BuildSummary.of(result, spec_path)


@task(name="check-catalog", cache_policy=NONE)
def check_catalog(name: str, catalog: str) -> list[dict[str, Any]]:
    """Catalog rows of ``name`` whose shard file is missing or has another size (WARNING each)."""
    from tasks.data.catalog import missing_shards

    problems = missing_shards(catalog, name)
    logger = get_run_logger()
    for p in problems:
        logger.warning("catalog: %s build %s shard %s is %s", name, p["build_id"], p["shard"], p["reason"])
    return problems


@task(name="catalog-build", cache_policy=NONE)
def catalog_build(
    summary: BuildSummary, spec_path: str, catalog: str, stale: list[str] | None = None
) -> None:
    """Record the build's manifest in the DuckDB catalog (replacing its rows); drop the rows of
    ``stale`` builds (other builds of the dataset whose shard files are gone)."""
    from tasks.core.identity import read_json
    from tasks.data.catalog import forget_build, record_build

    path = Path(summary.path)
    record_build(catalog, read_json(path / "manifest.json"), path, spec_path)
    for build_id in stale or []:
        forget_build(catalog, build_id)
        get_run_logger().warning("catalog: removed the rows of build %s, whose shards are gone", build_id)


@flow(name="build-data", flow_run_name="build-data-{name}")
def build_data(
    name: str,
    force: bool = False,
    data_root: str | None = None,
    spec_dir: str | None = None,
    verify_all: bool = False,
) -> dict:
    """Build one dataset spec by name (``mvlm data build NAME``); reruns reuse verified builds
    (``verify_all``: every shard hashed, not only the ones changed since their last full check).
    Returns the ``BuildSummary`` as a dict."""
    from tasks.core.settings import get_settings

    settings = get_settings()
    root = data_root or str(settings.data_root)
    spec_path = validate_spec(name, spec_dir)
    catalog = str(Path(root) / "catalog.duckdb")
    problems = check_catalog(name, catalog)
    summary = build_dataset_task(spec_path, root, force, verify_all)
    stale = sorted({p["build_id"] for p in problems} - {summary.build_id})
    catalog_build(summary, spec_path, catalog, stale)
    summary.catalog_repaired = [
        {**p, "action": "rows removed" if p["build_id"] in stale else "build repaired, rows rewritten"}
        for p in problems
    ]
    return dataclasses.asdict(summary)


def specs_for(names: list[str], profile: str | None, spec_dir: str | None = None) -> list[str]:
    """Spec names to build: the given names, or every spec of ``profile``."""
    from tasks.data.specs import load_all

    specs: dict[str, tuple[Path, DatasetSpec]] = load_all(spec_dir)
    if names:
        unknown = [n for n in names if n not in specs]
        if unknown:
            raise KeyError(f"no dataset spec named {unknown}; known: {', '.join(sorted(specs))}")
        return names
    if profile is None:
        raise ValueError(
            "name the specs to build, or pass --profile (tiny or real) to build all of a profile"
        )
    return [n for n, (_, spec) in specs.items() if spec.profile == profile]
