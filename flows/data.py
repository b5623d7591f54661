"""Prefect flow ``build-data``: validate, build (Ray fan-out inside), preview and catalog one spec."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NONE

from tasks.specs import DatasetSpec


@task(name="validate-spec", cache_policy=NONE)
def validate_spec(name: str, spec_dir: str | None) -> str:
    """Path of the spec called ``name`` (every spec in the folder must validate)."""
    from tasks.specs import find_spec

    return str(find_spec(name, spec_dir)[0])


@task(name="build-dataset", cache_policy=NONE)
def build_dataset_task(spec_path: str, data_root: str, force: bool) -> dict[str, Any]:
    """Build or reuse the dataset; returns a summary (name, build_id, path, reused, totals)."""
    from tasks.build import build_dataset
    from tasks.previews import token_chart

    result = build_dataset(spec_path, data_root, force=force)
    chart = result.path / "tokens.png"
    if not chart.exists():
        token_chart(result.manifest, chart)
    return {
        "name": result.name,
        "build_id": result.build_id,
        "path": str(result.path),
        "reused": result.reused,
        "kind": result.manifest["kind"],
        "totals": result.manifest["stats"]["totals"],
        "rejects": result.manifest["stats"]["rejects"],
        "shards": len(result.manifest["shards"]),
        "spec_path": str(spec_path),
    }


@task(name="catalog-build", cache_policy=NONE)
def catalog_build(summary: dict[str, Any], spec_path: str, catalog: str) -> None:
    """Record the build's manifest in the DuckDB catalog."""
    from tasks.catalog import record_build
    from tasks.identity import read_json

    path = Path(summary["path"])
    record_build(catalog, read_json(path / "manifest.json"), path, spec_path)


@flow(name="build-data", flow_run_name="build-data-{name}")
def build_data(
    name: str, force: bool = False, data_root: str | None = None, spec_dir: str | None = None
) -> dict:
    """Build one dataset spec by name (``mvlm data build NAME``); reruns reuse verified builds."""
    from tasks.settings import get_settings

    settings = get_settings()
    root = data_root or str(settings.data_root)
    spec_path = validate_spec(name, spec_dir)
    summary = build_dataset_task(spec_path, root, force)
    catalog_build(summary, spec_path, str(Path(root) / "catalog.duckdb"))
    return summary


def specs_for(names: list[str], profile: str | None, spec_dir: str | None = None) -> list[str]:
    """Spec names to build: the given names, or every spec of ``profile``."""
    from tasks.specs import load_all

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
