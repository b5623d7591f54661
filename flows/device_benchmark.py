"""The ``device-benchmark`` Prefect flow, deployed once per device work pool.

A runner is a Prefect process worker on (or beside) a device, polling that device class's pool
(``host-cpu``, ``snapdragon-888``, ``jetson-orin``, more in ``infra/runners/pools.yaml``). A flow
run fetches the quantized GGUFs from MLflow by run id (sha256-verified), runs the benchmark
protocol through the pool's backend and transport, and pushes the result into MLflow as a child
run of the quant run through the on-disk outbox, so an unreachable server loses nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

from prefect import flow, task

from tasks.lineage import tags as tag

log = logging.getLogger(__name__)

FLOW_NAME = "device-benchmark"
ENTRYPOINT = "flows/device_benchmark.py:device_benchmark"
REPO_ROOT = Path(__file__).resolve().parents[1]


@task(name="fetch-quant", retries=2, retry_delay_seconds=10)
def fetch_quant_task(quant_run_id: str, uri: str | None) -> Any:
    """Download the quant run's GGUFs (or reuse the verified cache)."""
    from tasks.lineage.quant_artifacts import fetch_quant

    return fetch_quant(quant_run_id, uri=uri)


@task(name="run-benchmark")
def run_benchmark_task(fetched: Any, pool: str, settings: dict[str, Any] | None, nonce: str) -> Any:
    """The protocol on the pool's device."""
    from tasks.ship.bench import device_class, run_benchmark, settings_for

    device = device_class(pool)
    protocol = settings_for(device, settings)
    return run_benchmark(
        fetched.llm, fetched.mmproj, fetched.quant_id, fetched.quant_type, device, protocol, nonce
    )


@task(name="push-results")
def push_results_task(payload: Any, uri: str | None) -> dict[str, Any]:
    """Store the payload in the outbox, then send everything pending."""
    from tasks.lineage.push import Outbox, flush

    outbox = Outbox()
    outbox.put(payload)
    report = flush(outbox, uri)
    return {"sent": report.sent, "kept": report.kept, "outbox": str(outbox.folder)}


def existing_result(identity: str, uri: str | None) -> str | None:
    """Run id of a complete result with ``identity`` when MLflow is reachable and has one."""
    from tasks.lineage.tracking import client, experiment_id, find_run, reachable, tracking_uri

    uri = tracking_uri(uri)
    if not reachable(uri):
        return None
    mlflow = client(uri)
    run = find_run(mlflow, experiment_id(mlflow), identity)
    return run.info.run_id if run is not None and run.data.tags.get(tag.COMPLETE) == "true" else None


@flow(name=FLOW_NAME)
def device_benchmark(
    quant_run_id: str,
    pool: str = "host-cpu",
    settings: dict[str, Any] | None = None,
    rerun: bool = False,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Benchmark the quantized model of MLflow run ``quant_run_id`` on ``pool``'s device; push the result."""
    from tasks.lineage.bench_runs import bench_payload
    from tasks.ship.bench import bench_identity, device_class, settings_for

    fetched = fetch_quant_task(quant_run_id, tracking_uri)
    device = device_class(pool)
    nonce = str(time.time_ns()) if rerun else ""
    identity = bench_identity(fetched.quant_id, device, settings_for(device, settings), nonce)
    done = existing_result(identity, tracking_uri)
    if done is not None:
        log.info("result %s already in MLflow (run %s); pass rerun=True to measure again", identity, done)
        return {"identity": identity, "run_id": done, "status": "exists"}
    result = run_benchmark_task(fetched, pool, settings, nonce)
    pushed = push_results_task(
        bench_payload(result, quant_run_id, fetched.export_id, fetched.model), tracking_uri
    )
    run_id = pushed["sent"].get(identity)
    status = "pushed" if run_id else "queued"
    return {"identity": identity, "run_id": run_id, "status": status, "metrics": result.metrics(), **pushed}


# --- pools and deployments ------------------------------------------------------------------------


async def ensure_pool(name: str, description: str) -> None:
    """Create the process work pool ``name`` unless it exists."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    async with get_client() as client:
        try:
            await client.read_work_pool(name)
        except ObjectNotFound:
            await client.create_work_pool(WorkPoolCreate(name=name, type="process", description=description))
            log.info("created work pool %s", name)


def deploy(
    pools: list[str] | None = None, source: str | None = None, env: dict[str, str] | None = None
) -> dict:
    """One ``device-benchmark`` deployment per pool (named after the pool); returns pool -> deployment id.

    ``source`` is where workers load the flow from: this repository's folder (default; runners on
    this machine or with the same checkout path) or a git URL for remote runners. ``env`` is passed
    to every flow run (MLFLOW_TRACKING_URI, MVLM_RUNS_ROOT, ...).
    """

    from tasks.ship.bench import load_pools

    devices = load_pools()
    names = pools or sorted(devices)
    unknown = sorted(set(names) - set(devices))
    if unknown:
        raise KeyError(f"unknown pool(s) {unknown}; pools file has {sorted(devices)}")
    flow_from_source = device_benchmark.from_source(source=source or str(REPO_ROOT), entrypoint=ENTRYPOINT)
    ids = {}
    for name in names:
        asyncio.run(ensure_pool(name, devices[name].description))
        ids[name] = str(
            flow_from_source.deploy(
                name=name,
                work_pool_name=name,
                parameters={"pool": name},
                job_variables={"env": env or {}},
                description=f"MobileVLM device benchmark on {devices[name].soc}",
                tags=["device-benchmark", name],
                build=False,
                push=False,
                print_next_steps=False,
            )
        )
    return ids


def submit(
    quant_run_id: str, pool: str, settings: dict | None = None, rerun: bool = False, wait_s: float = 0
):
    """Create a flow run of ``device-benchmark/<pool>``; wait up to ``wait_s`` seconds (0: return at once)."""
    from prefect.deployments import run_deployment

    parameters: dict[str, Any] = {"quant_run_id": quant_run_id, "pool": pool, "rerun": rerun}
    if settings:
        parameters["settings"] = settings
    return run_deployment(f"{FLOW_NAME}/{pool}", parameters=parameters, timeout=wait_s or 0)


def bench_on_pool(quant_run_id: str, pool: str, model_version: str, timeout_s: float) -> dict[str, Any]:
    """Benchmark on ``pool``: through its deployment when a Prefect server is configured (waiting up to
    ``timeout_s``; a missing deployment or no live runner leaves it pending, a run that failed is
    ``failed``, any other error is raised), else in-process for ``host-cpu``."""
    if os.environ.get("PREFECT_API_URL"):
        from prefect.exceptions import ObjectNotFound

        try:
            flow_run = submit(quant_run_id, pool, wait_s=timeout_s)
        except ObjectNotFound:  # no deployment for this pool: report it, do not fail the retrain
            reason = f"no deployment device-benchmark/{pool} on the Prefect server (deploy prefect.yaml)"
            return {"pool": pool, "status": "pending", "reason": reason}
        state = getattr(getattr(flow_run, "state", None), "type", None)
        name = getattr(state, "value", "UNKNOWN")
        if name in ("FAILED", "CRASHED", "CANCELLED"):  # a runner took it and it did not succeed
            reason = f"flow run {flow_run.id} ended {name}; see its logs in the Prefect UI"
            return {"pool": pool, "status": "failed", "reason": reason}
        if name != "COMPLETED":  # nobody picked it up (or it is still running) within timeout_s
            reason = f"flow run {flow_run.id} is {name} after {timeout_s:.0f} s: no live runner finished it"
            return {"pool": pool, "status": "pending", "reason": reason}
        result = {"status": "done"}
    elif pool == "host-cpu":
        result = device_benchmark(quant_run_id, pool)
    else:
        return {
            "pool": pool,
            "status": "pending",
            "reason": "no Prefect server (PREFECT_API_URL) to reach its runner",
        }
    run_id = result.get("run_id") or _bench_run_for(quant_run_id, pool)
    if not run_id:
        return {"pool": pool, "status": "pending", "reason": "no result in MLflow yet"}
    from tasks.lineage import tracking

    mlflow = tracking.client()
    mlflow.set_tag(run_id, tag.MODEL_VERSION, model_version)
    metrics = result.get("metrics") or mlflow.get_run(run_id).data.metrics
    status = "reused" if result.get("status") == "exists" else "done"
    return {"pool": pool, "status": status, "run_id": run_id, "metrics": metrics}


def _bench_run_for(quant_run_id: str, pool: str) -> str | None:
    from tasks.lineage import tracking

    mlflow = tracking.client()
    exp = tracking.experiment_id(mlflow, tracking.EXPERIMENT)
    runs = mlflow.search_runs([exp], filter_string=tag.search(tag.QUANT_RUN_ID, quant_run_id))
    return runs[0].info.run_id if runs else None
