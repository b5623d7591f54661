"""Steps that put a retrain's products into MLflow: build runs, registered models, exports, benchmarks.

Every function is idempotent: runs are found by their identity tag, model versions by theirs, so a
rerun (or a resumed crash) points at what exists instead of creating a second copy.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tasks.core import nested
from tasks.lineage import tags as tag
from tasks.lineage import tracking
from tasks.lineage.graph import code_commit, register

log = logging.getLogger(__name__)
"""Set (to the weights' sha256) once a stage's checkpoint artifacts are completely uploaded."""


def parent_run(mlflow: Any, recipe: str, identity: str) -> str:
    """The retrain's parent run (one per retrain identity)."""
    run_id, _ = tracking.run_for(
        mlflow,
        tracking.EXPERIMENT,
        f"retrain/{identity}",
        f"retrain {recipe}",
        {tag.KIND: "retrain", tag.RECIPE: recipe, tag.CODE_COMMIT: code_commit()},
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
        {tag.KIND: "build", tag.SPEC: summary["name"]},
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
        for name in ("tokens.png", "preview.png", "stats.json", "contamination.json"):
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
    mlflow: Any, name: str, recipe: str, stage: str, manifest: dict[str, Any], parent_model: str | None,
    retrain_run: str,
) -> str:  # fmt: skip
    """Log the stage's final checkpoint on its run and register it as a version of model ``name``
    (the recipe's name for that stage's output); returns ``name@version``."""
    run_id = manifest["mlflow_run_id"]
    run = mlflow.get_run(run_id)
    if run.data.tags.get(tag.CHECKPOINT_LOGGED) != manifest["final_sha256"]:  # a killed upload is redone
        mlflow.log_artifacts(run_id, manifest["final"], "checkpoint")
        mlflow.set_tag(run_id, tag.CHECKPOINT_LOGGED, manifest["final_sha256"])
    mlflow.set_tag(run_id, tag.CODE_COMMIT, code_commit())
    datasets = {b["spec"]: b["build_id"] for b in manifest["builds"]}
    return register(
        mlflow,
        name,
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
        {tag.KIND: "export", tag.MODEL_VERSION: model_version},
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
        numbers = nested.numbers(export.checks)
        if numbers:
            tracking.log_summary(mlflow, run_id, numbers)
        mlflow.set_terminated(run_id, "FINISHED")
    return run_id


def register_quant(
    mlflow: Any,
    name: str,
    recipe: str,
    quant: Any,
    quant_run_id: str,
    parent_run_id: str,
    parent_model: str,
    datasets: dict[str, str],
) -> str:
    """Nest the quant run under the retrain and register the GGUF as a version of model ``name``."""
    run = mlflow.get_run(quant_run_id)
    if "mlflow.parentRunId" not in run.data.tags:
        mlflow.set_tag(quant_run_id, "mlflow.parentRunId", parent_run_id)
    ref = register(
        mlflow,
        name,
        quant_run_id,
        run.info.artifact_uri,
        quant.quant_id,
        parent_model,
        datasets,
        f"{recipe} GGUF {quant.quant_type}",
        parent_run_id,
    )
    mlflow.set_tag(quant_run_id, tag.MODEL_VERSION, ref)
    mlflow.set_tag(quant_run_id, tag.CODE_COMMIT, code_commit())
    return ref
