"""Crash anywhere: the tiny retrain SIGKILLed at K >= 10 seeded moments, restarted each time.

The killed run is ``mvlm retrain tiny`` in a subprocess, pushing to a real ``mlflow server``; the
harness (``tasks.testkit.chaos``) kills its whole process tree (driver, Ray, Prefect's temporary server,
data-loader workers) at fault points during shard writes, inside training steps, between the files
of a checkpoint save, after metrics reach MLflow, during outbox pushes and registrations, and at
seeded times. After the last restart completes, everything is compared with the session's
uninterrupted run (``tiny_retrain``): shards, catalog rows, losses, evaluations, registered model
versions, MLflow runs (one per step, none left RUNNING) and device results.

The same run carries a planted secret in ``HF_TOKEN`` and ``AWS_SECRET_ACCESS_KEY``: every byte it
writes (data, runs, both MLflow stores and artifacts, Prefect's database, logs) is grepped for it.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import pytest
from export_fixtures import MlflowServer, free_port

from tasks.lineage import tags as tag

pytestmark = pytest.mark.slow

KILLS = 13
SEED = 20261125
REPORT = "chaos-report.json"


@pytest.fixture(scope="module")
def chaos(tiny_retrain: tuple[Path, dict], tmp_path_factory) -> dict:
    """Run the chaos retrain; returns paths, the attempts and the planted secret."""
    from tasks.testkit.chaos import chaos_run, plan_kills

    root = tmp_path_factory.mktemp("chaos")
    work = root / "work"
    (work / "data").mkdir(parents=True)
    (work / "data" / "samples").symlink_to(tiny_retrain[0] / "data" / "samples")
    server = MlflowServer(root / "mlflow", free_port())
    server.root.mkdir()
    secret = "hf_" + secrets.token_hex(16)
    env = {
        **os.environ,
        "MVLM_WORK_DIR": str(work),
        "MLFLOW_TRACKING_URI": server.url,
        # each attempt starts Prefect's temporary server on this database (a PREFECT_API_URL would send
        # the device benchmarks to work pools, which this run has no runner for)
        "PREFECT_HOME": str(root / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MVLM_NO_PROGRESS": "1",
        "HF_TOKEN": secret,
        "AWS_SECRET_ACCESS_KEY": secret[::-1],
    }
    for key in ("PREFECT_API_URL", "RAY_ADDRESS"):
        env.pop(key, None)
    started = time.time()
    try:
        server.start()
        kills = plan_kills(KILLS, SEED)
        attempts = chaos_run(
            [sys.executable, "-m", "flows.cli", "retrain", "tiny"],
            kills,
            root / "out",
            env,
            attempt_timeout_s=900,
        )
    finally:
        server.stop()
    server.start()  # read back what the killed runs left
    report = {"kills": [k.describe() for k in kills], "attempts": [asdict(a) for a in attempts]}
    report["seconds"] = round(time.time() - started, 1)
    (root / REPORT).write_text(json.dumps(report, indent=2))
    yield {
        "root": root,
        "work": work,
        "server": server,
        "attempts": attempts,
        "secret": secret,
        "report": report,
    }
    server.stop()


@pytest.fixture(scope="module")
def stores(tiny_retrain: tuple[Path, dict], chaos: dict):
    """(reference client, chaos client)."""
    from tasks.lineage import tracking

    return tracking.client(f"sqlite:///{tiny_retrain[0] / 'mlflow.db'}"), tracking.client(chaos["server"].url)


def test_at_least_ten_kills_landed_and_every_process_died(chaos: dict) -> None:
    attempts = chaos["attempts"]
    landed = [a for a in attempts if a.outcome == "killed"]
    assert len(landed) >= 10, [(a.planned, a.outcome) for a in attempts]
    assert all(a.survivors == 0 for a in landed)
    assert attempts[-1].outcome in ("exit", "missed") and attempts[-1].returncode == 0
    points = {a.landed.get("point") for a in landed}
    assert {"shard-sample", "train-step", "checkpoint-file", "mlflow-push"} <= points, points


def test_shards_and_catalog_rows_equal_the_uninterrupted_run(
    tiny_retrain: tuple[Path, dict], chaos: dict
) -> None:
    from tasks.data.catalog import query

    def builds(work: Path) -> dict:
        out = {}
        for manifest in sorted((work / "data").glob("builds/*/*/manifest.json")):
            data = json.loads(manifest.read_text())
            out[data["build_id"]] = [(s["path"], s["sha256"], s["samples"]) for s in data["shards"]]
        return out

    def rows(work: Path) -> dict:
        catalog = work / "data" / "catalog.duckdb"
        out = {}
        for table, cols in {
            "builds": "build_id, name, kind, code_version, tokenizer_hash, samples, tokens, bytes, rejected, "
            "read, shards",
            "shards": "*",
            "source_counts": "*",
            "rejects": "*",
            "datasets": "name, kind, profile, license, latest_build",
        }.items():
            out[table] = sorted(query(catalog, f"SELECT {cols} FROM {table}")[1])
        return out

    reference, chaotic = builds(tiny_retrain[0]), builds(chaos["work"])
    assert reference and chaotic == reference
    assert rows(chaos["work"]) == rows(tiny_retrain[0])
    leftovers = [p for p in (chaos["work"] / "data").rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers


def _runs(mlflow) -> list:
    from tasks.lineage import tracking

    exp = tracking.experiment_id(mlflow, tracking.EXPERIMENT)
    return mlflow.search_runs([exp], max_results=5000)


def test_training_losses_and_evaluations_equal_the_uninterrupted_run(stores) -> None:
    curves, evals = [], []
    for mlflow in stores:
        runs = _runs(mlflow)
        stage_runs = {r.data.tags["mvlm.stage"]: r for r in runs if r.data.tags.get("mvlm.kind") == "stage"}
        curve = {}
        for stage, run in stage_runs.items():
            history = mlflow.get_metric_history(run.info.run_id, "loss")
            steps = [m.step for m in history]
            assert len(steps) == len(set(steps)), f"{stage}: a step was logged twice"
            curve[stage] = {m.step: m.value for m in history}
        curves.append(curve)
        evals.append(
            {r.info.run_name: r.data.metrics for r in runs if r.data.tags.get("mvlm.kind") == "evaluation"}
        )
    reference, chaotic = curves
    assert set(chaotic) == set(reference) == {"llm-pretrain", "vlm-align", "vlm-instruct"}
    for stage in reference:
        assert sorted(chaotic[stage]) == sorted(reference[stage]), stage
        worst = max(abs(chaotic[stage][s] - reference[stage][s]) for s in reference[stage])
        assert worst <= 1e-5, (stage, worst)
    assert evals[0] and set(evals[1]) == set(evals[0])
    for name, metrics in evals[0].items():
        assert evals[1][name] == pytest.approx(metrics, abs=1e-5), name


def test_one_finished_run_per_step_and_the_same_model_versions(stores) -> None:

    summaries = []
    for mlflow in stores:
        runs = _runs(mlflow)
        identities = Counter(r.data.tags.get(tag.IDENTITY, f"untagged:{r.info.run_id}") for r in runs)
        duplicated = {k: n for k, n in identities.items() if n > 1}
        assert not duplicated, duplicated
        unfinished = [(r.info.run_name, r.info.status) for r in runs if r.info.status != "FINISHED"]
        assert not unfinished, unfinished
        kinds = Counter(r.data.tags.get("mvlm.kind", "?") for r in runs)
        versions = {
            (v.name, int(v.version), v.tags.get(tag.IDENTITY))
            for m in mlflow.search_registered_models()
            for v in mlflow.search_model_versions(f"name='{m.name}'")
        }
        stable = sorted(
            r.data.tags.get(tag.IDENTITY, "") for r in runs if r.data.tags.get("mvlm.kind") != "bench"
        )
        summaries.append((kinds, versions, stable))  # bench identities hold a per-measurement nonce
    (ref_kinds, ref_versions, ref_ids), (kinds, versions, ids) = summaries
    assert kinds == ref_kinds, (kinds, ref_kinds)
    assert versions == ref_versions and len(versions) == 5, (versions, ref_versions)  # 3 stages + 2 quants
    assert ids == ref_ids, set(ids) ^ set(ref_ids)


def test_one_set_of_device_results(stores) -> None:
    counts = []
    for mlflow in stores:
        bench = [r for r in _runs(mlflow) if r.data.tags.get("mvlm.kind") == "bench"]
        assert all(r.data.tags.get("mvlm.push_complete") == "true" for r in bench)
        counts.append(Counter((r.data.tags["quant_type"], r.data.tags["device"]) for r in bench))
    assert counts[1] == counts[0] and sum(counts[0].values()) == 2


def test_no_planted_secret_in_anything_the_run_wrote(chaos: dict) -> None:
    secret = chaos["secret"].encode()
    roots = [chaos["root"], *_ray_sessions_since(chaos["report"]["seconds"])]
    scanned, leaks, control = 0, [], 0
    for root in roots:
        for path in root.rglob("*"):
            if path.is_symlink() or not path.is_file():
                continue
            data = path.read_bytes()
            scanned += 1
            if secret in data or secret[::-1] in data:
                leaks.append(str(path))
            control += str(chaos["work"]).encode() in data
    assert scanned > 100 and control > 10  # the scan sees files that do record the environment's paths
    assert not leaks, leaks


def _ray_sessions_since(seconds: float) -> list[Path]:
    cutoff = time.time() - seconds - 60
    return [p for p in Path("/tmp/ray").glob("session_2*") if p.is_dir() and p.stat().st_mtime >= cutoff]


def test_no_prefect_run_left_running(chaos: dict) -> None:
    """Each killed retrain's flow run, subflows and task runs end Crashed (found by the next run)."""
    import sqlite3

    from flows.flow_runs import ACTIVE

    con = sqlite3.connect(chaos["root"] / "prefect" / "prefect.db")
    try:
        retrains = con.execute("SELECT state_type FROM flow_run WHERE name = 'retrain-tiny'").fetchall()
        active_flows = con.execute(
            f"SELECT name, state_type FROM flow_run WHERE state_type IN {ACTIVE}"
        ).fetchall()
        active_tasks = con.execute(
            f"SELECT name, state_type FROM task_run WHERE state_type IN {ACTIVE}"
        ).fetchall()
    finally:
        con.close()
    assert not active_flows and not active_tasks, (active_flows, active_tasks)
    states = Counter(s for (s,) in retrains)
    assert states["COMPLETED"] == 1 and states["CRASHED"] >= 5, states
