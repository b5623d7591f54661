"""The ``build-data`` Prefect flow on the tiny specs, the DuckDB catalog it fills and ``mvlm data``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from flows.cli import app
from tasks.core.identity import read_json
from tasks.data.catalog import query
from tasks.data.specs import load_all
from tasks.testkit.sample_tree import load_summary

pytestmark = pytest.mark.usefixtures("prefect_api", "ray_local")

NAMES = ("tiny-redpajama", "tiny-llava-instruct", "tiny-sharegpt")
runner = CliRunner(env={"COLUMNS": "200"})  # rich reads the width at print time


@pytest.fixture(scope="module")
def root(samples_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root of this module's own (its catalog holds only these builds) seeing ``samples/``."""
    data_root = tmp_path_factory.mktemp("flow_root")
    (data_root / "samples").symlink_to(samples_root / "samples")
    return data_root


@pytest.fixture(scope="module")
def flow_runs(root: Path, prefect_api: None, ray_local: None) -> dict[str, list[dict[str, Any]]]:
    """Each tiny spec built twice by the real flow: {name: [first summary, second summary]}."""
    from flows.data import build_data

    return {name: [build_data(name, data_root=str(root)) for _ in range(2)] for name in NAMES}


def _catalog(root: Path) -> Path:
    return root / "catalog.duckdb"


def _rows(root: Path, sql: str, *params: Any) -> list[tuple]:
    return query(_catalog(root), sql, list(params))[1]


def _manifest(summary: dict[str, Any]) -> dict[str, Any]:
    return read_json(Path(summary["path"]) / "manifest.json")


@pytest.mark.parametrize("name", NAMES)
def test_flow_builds_then_reuses(flow_runs: dict, root: Path, name: str) -> None:
    first, second = flow_runs[name]
    manifest = _manifest(first)
    assert first["name"] == name and first["kind"] == load_all()[name][1].kind
    assert Path(first["path"]) == root / "builds" / name / first["build_id"]
    assert second["reused"] is True
    assert {k: v for k, v in second.items() if k != "reused"} == {
        k: v for k, v in first.items() if k != "reused"
    }
    assert first["totals"] == manifest["stats"]["totals"] and first["shards"] == len(manifest["shards"])
    assert (Path(first["path"]) / "tokens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name", NAMES)
def test_catalog_rows_equal_the_manifest(flow_runs: dict, root: Path, name: str) -> None:
    summary = flow_runs[name][0]
    manifest, build_id = _manifest(summary), summary["build_id"]
    assert _rows(root, "SELECT name, kind, latest_build FROM datasets WHERE name = ?", name) == [
        (name, manifest["kind"], build_id)
    ]
    shards = sorted(
        (s["path"], s["split"], s["subset"], s["sha256"], s["samples"]) for s in manifest["shards"]
    )
    got = _rows(
        root,
        "SELECT path, split, subset, sha256, samples FROM shards WHERE build_id = ? ORDER BY path",
        build_id,
    )
    assert got == shards
    stats = manifest["stats"]
    counts = _rows(
        root,
        "SELECT subset, weight, read, kept, rejected, tokens, counts_json FROM source_counts "
        "WHERE build_id = ?",
        build_id,
    )
    assert {r[0]: json.loads(r[6]) for r in counts} == stats["subsets"]
    assert {r[0]: (r[2], r[3], r[4], r[5]) for r in counts} == {
        sub: (c["read"], c["kept"], c["rejected"], c.get("tokens", 0)) for sub, c in stats["subsets"].items()
    }
    assert {r[0]: r[1] for r in counts} == pytest.approx(manifest["weights"])
    rejects = _rows(root, "SELECT reason, count FROM rejects WHERE build_id = ?", build_id)
    assert dict(rejects) == stats["rejects"]
    build = _rows(
        root, "SELECT samples, tokens, read, rejected, shards FROM builds WHERE build_id = ?", build_id
    )
    totals = stats["totals"]
    assert build == [
        (
            sum(s["samples"] for s in manifest["shards"]),
            sum(s["tokens"] for s in manifest["shards"]),
            totals["read"],
            totals["rejected"],
            len(manifest["shards"]),
        )
    ]


def test_second_runs_add_no_catalog_rows(flow_runs: dict, root: Path) -> None:
    ids = [flow_runs[n][0]["build_id"] for n in NAMES]
    n_shards = sum(flow_runs[n][0]["shards"] for n in NAMES)
    assert _rows(root, "SELECT count(*), count(DISTINCT build_id) FROM builds") == [(3, 3)]
    assert _rows(root, "SELECT count(*) FROM datasets") == [(3,)]
    assert _rows(root, "SELECT count(*) FROM shards") == [(n_shards,)]
    assert sorted(r[0] for r in _rows(root, "SELECT build_id FROM builds")) == sorted(ids)


def test_redpajama_rejects_are_the_generators_duplicates_and_empties(flow_runs: dict, root: Path) -> None:
    summary = load_summary(root / "samples")
    build_id = flow_runs["tiny-redpajama"][0]["build_id"]
    rejects = dict(_rows(root, "SELECT reason, count FROM rejects WHERE build_id = ?", build_id))
    duplicates = sum(c.duplicates for c in summary.redpajama.values())
    empty = sum(c.empty for c in summary.redpajama.values())
    assert rejects == {"duplicate": duplicates, "empty": empty} == {"duplicate": 14, "empty": 7}
    per_subset = _rows(root, "SELECT subset, read, rejected FROM source_counts WHERE build_id = ?", build_id)
    assert {s: (r, x) for s, r, x in per_subset} == {
        s: (c.docs, c.duplicates + c.empty) for s, c in summary.redpajama.items()
    }


def test_instruct_and_chat_builds_keep_every_generated_sample(flow_runs: dict, root: Path) -> None:
    """Every generated conversation is kept; the planted eval images and questions are rejected."""
    from tasks.testkit.sample_tree import load_summary

    planted = load_summary(root / "samples").planted
    in_instruct = len(planted["eval_images"]) + sum(
        q["source"] == "llava/instruct.json" for q in planted["eval_questions"]
    )
    in_chat = sum(q["source"] == "sharegpt/chat.json" for q in planted["eval_questions"])
    summary_instruct = flow_runs["tiny-llava-instruct"][0]["totals"]
    summary_chat = flow_runs["tiny-sharegpt"][0]["totals"]
    assert summary_instruct["rejected"] == in_instruct == 3
    assert summary_instruct["kept"] == summary_instruct["images"] == summary_instruct["read"] - 3
    assert summary_chat["rejected"] == in_chat == 1
    assert summary_chat["kept"] == summary_chat["text_only"] == summary_chat["read"] - 1


def test_cli_stats_shows_subsets_and_reasons(flow_runs: dict, root: Path) -> None:
    result = runner.invoke(app, ["data", "stats", "tiny-redpajama", "--data-root", str(root)])
    assert result.exit_code == 0, result.output
    assert flow_runs["tiny-redpajama"][0]["build_id"] in result.output
    for word in ("arxiv", "book", "c4", "github", "stackexchange", "wikipedia", "duplicate", "empty"):
        assert word in result.output
    assert "train" in result.output and "heldout" in result.output


def test_cli_sql_prints_the_count(flow_runs: dict, root: Path) -> None:
    result = runner.invoke(app, ["data", "sql", "SELECT count(*) AS n FROM shards", "--data-root", str(root)])
    assert result.exit_code == 0, result.output
    n_shards = sum(flow_runs[n][0]["shards"] for n in NAMES)
    assert str(n_shards) in result.output.split()


def test_cli_sql_is_read_only(flow_runs: dict, root: Path) -> None:
    before = _rows(root, "SELECT count(*) FROM shards")
    result = runner.invoke(app, ["data", "sql", "DELETE FROM shards", "--data-root", str(root)])
    assert result.exit_code == 1
    assert "read-only" in result.output
    assert _rows(root, "SELECT count(*) FROM shards") == before


def test_cli_list_shows_latest_builds(flow_runs: dict, root: Path) -> None:
    result = runner.invoke(app, ["data", "list", "--data-root", str(root)])
    assert result.exit_code == 0, result.output
    for name in NAMES:
        assert name in result.output and flow_runs[name][0]["build_id"] in result.output


def test_cli_build_unknown_spec_exits_2_naming_known_ones(root: Path) -> None:
    result = runner.invoke(app, ["data", "build", "unknown-name", "--data-root", str(root)])
    assert result.exit_code == 2
    assert "unknown-name" in result.output
    for name in load_all():
        assert name in result.output


def test_cli_build_reuse_hashes_changed_shards_and_verify_all_hashes_every_one(
    flow_runs: dict, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks.data import shards, verified

    monkeypatch.setattr(verified, "RACY_NS", 0)
    hashed: list[str] = []
    real = shards.sha256_file
    monkeypatch.setattr(shards, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    name = "tiny-sharegpt"
    every = sorted(Path(s["path"]).name for s in _manifest(flow_runs[name][0])["shards"])
    counts = []
    for flags in ([], [], ["--verify-all"]):
        hashed.clear()
        result = runner.invoke(app, ["data", "build", name, "--data-root", str(root), *flags])
        assert result.exit_code == 0 and "reused" in result.output, result.output
        counts.append(sorted(hashed))
    assert set(counts[0]) <= set(every) and counts[1] == [] and counts[2] == every
