"""Steps that put a retrain's products into MLflow: build runs, registered models, exports, benchmarks.

Every function is idempotent: runs are found by their identity tag, model versions by theirs, so a
rerun (or a resumed crash) points at what exists instead of creating a second copy.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from tasks import tracking
from tasks.lineage import code_commit, model_name, register

log = logging.getLogger(__name__)
CHECKPOINT_LOGGED_TAG = "mvlm.checkpoint_logged"
"""Set (to the weights' sha256) once a stage's checkpoint artifacts are completely uploaded."""


def parent_run(mlflow: Any, recipe: str, identity: str) -> str:
    """The retrain's parent run (one per retrain identity)."""
    run_id, _ = tracking.run_for(
        mlflow,
        tracking.EXPERIMENT,
        f"retrain/{identity}",
        f"retrain {recipe}",
        {"mvlm.kind": "retrain", "mvlm.recipe": recipe, "mvlm.code_commit": code_commit()},
    )
    tracking.log_params(mlflow, run_id, {"recipe": recipe, "retrain_identity": identity})  # idempotent
    return run_id


def log_build(mlflow: Any, summary: dict[str, Any], parent_run_id: str) -> str:
    """A child run for a dataset build: the dataset as input, counts as metrics, previews as artifacts."""
    run_id, created = tracking.run_for(
        mlflow,
        tracking.EXPERIMENT,
        f"build/{summary['build_id']}",
        f"data {summary['name']}",
        {"mvlm.kind": "build", "mvlm.spec": summary["name"]},
        parent_run_id,
    )
    if created or tracking.unfinished(mlflow, run_id):  # every call below is idempotent
        path = Path(summary["path"])
        tracking.log_params(
            mlflow,
            run_id,
            {
                "spec": summary["name"],
                "build_id": summary["build_id"],
                "kind": summary["kind"],
                "spec_path": summary.get("spec_path", ""),
                **_source_params(path),
            },
        )
        tracking.log_dataset(
            mlflow, run_id, summary["name"], summary["build_id"], str(path / "shards"), "build"
        )
        tracking.log_summary(mlflow, run_id, {k: float(v) for k, v in summary["totals"].items()})
        for name in ("tokens.png", "preview.png", "stats.json"):
            if (path / name).is_file():
                mlflow.log_artifact(run_id, str(path / name))
        mlflow.set_terminated(run_id, "FINISHED")
    used = {d.dataset.digest for d in mlflow.get_run(parent_run_id).inputs.dataset_inputs}
    if summary["build_id"] not in used:  # the retrain run lists every dataset it used
        shards = str(Path(summary["path"]) / "shards")
        tracking.log_dataset(mlflow, parent_run_id, summary["name"], summary["build_id"], shards)
    return run_id


def _source_params(build_dir: Path) -> dict[str, str]:
    """What the sources were, for lineage: the hub commit of every hub subset, the URL list's sha256
    and file count of every remote-files subset (the manifest holds the whole fingerprint)."""
    manifest = build_dir / "manifest.json"
    if not manifest.is_file():
        return {}
    params = {}
    for subset, source in json.loads(manifest.read_text()).get("source", {}).items():
        if isinstance(source, dict) and source.get("sha"):
            params[f"source.{subset}.commit"] = f"{source['dataset']}@{source['sha']}"
        elif isinstance(source, dict) and "files" in source:
            params[f"source.{subset}.files"] = str(len(source["files"]))
            if source.get("list_sha256"):
                params[f"source.{subset}.list_sha256"] = source["list_sha256"]
    return params


def register_stage(
    mlflow: Any, recipe: str, stage: str, manifest: dict[str, Any], parent_model: str | None, retrain_run: str
) -> str:
    """Log the stage's final checkpoint on its run and register it; returns ``name@version``."""
    run_id = manifest["mlflow_run_id"]
    run = mlflow.get_run(run_id)
    if run.data.tags.get(CHECKPOINT_LOGGED_TAG) != manifest["final_sha256"]:  # a killed upload is redone
        mlflow.log_artifacts(run_id, manifest["final"], "checkpoint")
        mlflow.set_tag(run_id, CHECKPOINT_LOGGED_TAG, manifest["final_sha256"])
    mlflow.set_tag(run_id, "mvlm.code_commit", code_commit())
    datasets = {b["spec"]: b["build_id"] for b in manifest["builds"]}
    return register(
        mlflow,
        model_name(recipe, stage),
        run_id,
        f"{run.info.artifact_uri}/checkpoint",
        manifest["stage_id"],
        parent_model,
        datasets,
        f"{recipe} {stage} output",
        retrain_run,
    )


def log_export(mlflow: Any, export: Any, parent_run_id: str, model_version: str) -> str:
    """A child run for a GGUF export with its checks as metrics."""
    run_id, created = tracking.run_for(
        mlflow,
        tracking.EXPERIMENT,
        f"export/{export.export_id}",
        "export gguf",
        {"mvlm.kind": "export", "mvlm.model_version": model_version},
        parent_run_id,
    )
    if created or tracking.unfinished(mlflow, run_id):  # every call below is idempotent
        tracking.log_params(
            mlflow,
            run_id,
            {
                "export_id": export.export_id,
                "llm": export.llm.name,
                "mmproj": export.mmproj.name if export.mmproj else "none",
            },
        )
        numbers = {k: float(v) for k, v in _flat_numbers(export.checks).items()}
        if numbers:
            tracking.log_summary(mlflow, run_id, numbers)
        mlflow.set_terminated(run_id, "FINISHED")
    return run_id


def _flat_numbers(data: Any, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out |= _flat_numbers(value, f"{prefix}{key}.")
    elif isinstance(data, int | float) and not isinstance(data, bool):
        out[prefix.rstrip(".")] = float(data)
    return out


def register_quant(
    mlflow: Any,
    recipe: str,
    quant: Any,
    quant_run_id: str,
    parent_run_id: str,
    parent_model: str,
    datasets: dict[str, str],
) -> str:
    """Nest the quant run under the retrain and register the GGUF as a model version."""
    run = mlflow.get_run(quant_run_id)
    if "mlflow.parentRunId" not in run.data.tags:
        mlflow.set_tag(quant_run_id, "mlflow.parentRunId", parent_run_id)
    ref = register(
        mlflow,
        model_name(recipe, quant.quant_type),
        quant_run_id,
        run.info.artifact_uri,
        quant.quant_id,
        parent_model,
        datasets,
        f"{recipe} GGUF {quant.quant_type}",
        parent_run_id,
    )
    mlflow.set_tag(quant_run_id, "mvlm.model_version", ref)
    mlflow.set_tag(quant_run_id, "mvlm.code_commit", code_commit())
    return ref


def bench_on_pool(quant_run_id: str, pool: str, model_version: str, timeout_s: float) -> dict[str, Any]:
    """Benchmark on ``pool``: through its deployment when a Prefect server is configured (waiting up to
    ``timeout_s``; a missing deployment or no live runner leaves it pending, a run that failed is
    ``failed``, any other error is raised), else in-process for ``host-cpu``."""
    from flows.device_benchmark import device_benchmark, submit

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
    mlflow = tracking.client()
    mlflow.set_tag(run_id, "mvlm.model_version", model_version)
    metrics = result.get("metrics") or mlflow.get_run(run_id).data.metrics
    status = "reused" if result.get("status") == "exists" else "done"
    return {"pool": pool, "status": status, "run_id": run_id, "metrics": metrics}


def _bench_run_for(quant_run_id: str, pool: str) -> str | None:
    mlflow = tracking.client()
    exp = tracking.experiment_id(mlflow, tracking.EXPERIMENT)
    runs = mlflow.search_runs([exp], filter_string=f"tags.`mvlm.quant_run_id` = '{quant_run_id}'")
    return runs[0].info.run_id if runs else None
