"""Prefect flow ``retrain``: data, stages, evaluation, export, quantization, device benchmarks.

Every step is reused by identity when its inputs did not change, so a second run with nothing new
finishes in seconds and says what it reused. A failure names the step; everything finished before it
stays, and the next run continues from there. All steps are MLflow child runs of one parent run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from prefect import flow, task
from prefect.cache_policies import NONE

from tasks.lineage import tags as tag

log = logging.getLogger(__name__)
DEFAULT_QUANTS = {"tiny": ("q8_0", "q4_0"), "tiny-v2": ("q8_0", "q4_0")}
PAPER_QUANTS = ("q4_k_s", "q8_0")
Step = Literal["data", "train", "export", "quantize", "benchmark"]
STEPS: tuple[str, ...] = ("data", "train", "export", "quantize", "benchmark")
"""The retrain's steps in order; ``until`` stops after one of them."""


class RetrainError(RuntimeError):
    """A retrain step failed; the message names the step."""


def retrain_identity(recipe_name: str, data_root: str) -> str:
    """Hash of the recipe rows, the current dataset build ids and the code versions."""
    from tasks.core.identity import CODE_VERSIONS, hash_json
    from tasks.data.build import make_context
    from tasks.data.specs import find_spec
    from tasks.train.recipes import get_recipe, stage_dict

    recipe = get_recipe(recipe_name)
    specs = sorted({d.spec for s in recipe.enabled_stages() for d in s.datasets})
    builds = {spec: make_context(find_spec(spec)[0], data_root).build_id for spec in specs}
    return hash_json(
        {"recipe": [stage_dict(s) for s in recipe.enabled_stages()], "builds": builds, "code": CODE_VERSIONS}
    )


@task(name="publish-build", cache_policy=NONE)
def publish_build_task(summary: dict, parent_run_id: str) -> str:
    """The build's MLflow child run."""
    from tasks.lineage import tracking
    from tasks.lineage.publish import log_build

    return log_build(tracking.client(), summary, parent_run_id)


@task(name="register-stage", cache_policy=NONE)
def register_stage_task(
    recipe: str, stage: str, manifest: dict, parent_model: str | None, retrain_run: str
) -> str:
    """Registered model version of a stage output."""
    from tasks.lineage import tracking
    from tasks.lineage.publish import register_stage

    return register_stage(tracking.client(), recipe, stage, manifest, parent_model, retrain_run)


@task(name="export", cache_policy=NONE)
def export_task(final: str, parent_run_id: str, model_version: str) -> Any:
    """GGUF export (LLM + mmproj) with its checks, as an MLflow child run."""
    from tasks.lineage import tracking
    from tasks.lineage.publish import log_export
    from tasks.ship.export import export_checkpoint

    export = export_checkpoint(final, check=True)
    log_export(tracking.client(), export, parent_run_id, model_version)
    return export


@task(name="quantize", cache_policy=NONE)
def quantize_task(
    recipe: str, export: Any, quant_type: str, parent_run_id: str, parent_model: str, datasets: dict[str, str]
) -> dict[str, Any]:
    """llama.cpp quantization logged to MLflow and registered as a model version."""
    from tasks.lineage import tracking
    from tasks.lineage.publish import register_quant
    from tasks.lineage.push import log_quant
    from tasks.ship.quantize import quantize

    quant = quantize(export.llm, quant_type)
    run_id = log_quant(quant)
    ref = register_quant(tracking.client(), recipe, quant, run_id, parent_run_id, parent_model, datasets)
    return {"quant_type": quant_type, "run_id": run_id, "model_version": ref, "bytes": _size(quant.out_dir)}


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.gguf"))


@task(name="device-benchmark", cache_policy=NONE)
def bench_task(quant: dict[str, Any], pool: str, timeout_s: float) -> dict[str, Any]:
    """Benchmark one quantization on one pool (pending, not failed, when no runner answers)."""
    from flows.device_benchmark import bench_on_pool

    return {
        "quant_type": quant["quant_type"],
        **bench_on_pool(quant["run_id"], pool, quant["model_version"], timeout_s),
    }


@task(name="device-chart", cache_policy=NONE)
def device_chart_task(parent_run_id: str, runs_root: str) -> str:
    """Bar chart of our device results beside the paper's, logged on the retrain run."""
    from tasks.lineage import tracking
    from tasks.lineage.bench_runs import report_rows
    from tasks.ship.bench import write_chart

    path = write_chart(
        report_rows(), Path(runs_root) / "reports" / f"device-benchmarks-{parent_run_id[:8]}.png"
    )
    tracking.client().log_artifact(parent_run_id, str(path), "plots")
    return str(path)


@task(name="lineage", cache_policy=NONE)
def lineage_task(model_version: str, parent_run_id: str, runs_root: str) -> str:
    """The lineage graph of the final model as an HTML artifact of the retrain run."""
    from tasks.core.identity import atomic_write_text
    from tasks.lineage import tracking
    from tasks.lineage.graph import downstream, render_html, upstream

    mlflow = tracking.client()
    page = render_html(
        upstream(mlflow, model_version), downstream(mlflow, model_version), f"lineage of {model_version}"
    )
    path = atomic_write_text(Path(runs_root) / "lineage" / f"{model_version.replace('@', '-v')}.html", page)
    mlflow.log_artifact(parent_run_id, str(path), "lineage")
    return str(path)


def _step(name: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as err:
        raise RetrainError(
            f"retrain step {name!r} failed: {err}; finished steps are kept, rerun to continue"
        ) from err


@flow(name="retrain", flow_run_name="retrain-{recipe_name}")
def retrain(
    recipe_name: str,
    from_stage: str | None = None,
    force: list[str] | None = None,
    pools: list[str] | None = None,
    quant_types: list[str] | None = None,
    bench_timeout_s: float = 600,
    data_root: str | None = None,
    runs_root: str | None = None,
    until: Step | None = None,
) -> dict[str, Any]:
    """Build or reuse data, train, evaluate, export, quantize and benchmark one recipe.

    ``from_stage`` retrains that stage and every later one; ``force`` names stages to retrain;
    ``pools`` are device work pools to benchmark on (default host-cpu); ``quant_types`` default to
    q8_0+q4_0 for tiny models and the paper's q4_k_s+q8_0 otherwise. ``until`` stops after that step
    (``data``, ``train``, ``export``, ``quantize``; default: run everything): the summary's
    ``stopped_after`` says where, and a rerun without it continues from there (reusing what exists).

    One retrain of a recipe runs at a time per runs root (a second one waits for the lock); the
    flow run that a killed retrain left running in Prefect is marked Crashed by the next one.
    """
    from flows.flow_runs import current_flow_run_id, take_over
    from tasks.core.locks import exclusive
    from tasks.core.settings import get_settings

    runs = Path(runs_root or get_settings().runs_root)
    runs.mkdir(parents=True, exist_ok=True)
    with exclusive(runs / f".retrain-{recipe_name}.lock"):
        take_over(runs / f".retrain-{recipe_name}.flow_run.json", current_flow_run_id())
        return _retrain(
            recipe_name, from_stage, force, pools, quant_types, bench_timeout_s, data_root, runs_root, until
        )


def _retrain(
    recipe_name: str,
    from_stage: str | None,
    force: list[str] | None,
    pools: list[str] | None,
    quant_types: list[str] | None,
    bench_timeout_s: float,
    data_root: str | None,
    runs_root: str | None,
    until: Step | None,
) -> dict[str, Any]:
    """The steps of ``retrain``, with the recipe's lock held."""
    from flows.data import build_data
    from flows.train import run_stages
    from tasks.core.settings import get_settings
    from tasks.train.recipes import get_recipe

    settings = get_settings()
    data_root, runs_root = data_root or str(settings.data_root), runs_root or str(settings.runs_root)
    recipe = get_recipe(recipe_name)
    forced = recipe.stages_to_retrain(from_stage, force or ())
    parent = _step("parent-run", _parent, recipe_name, data_root)
    specs = sorted({d.spec for s in recipe.enabled_stages() for d in s.datasets})
    builds = [_step(f"data:{spec}", build_data, spec, data_root=data_root) for spec in specs]
    for summary in builds:
        publish_build_task(summary, parent)
    if until == "data":
        return _stopped(parent, "data", builds=builds)
    stages = _step("train", run_stages, recipe_name, None, data_root, runs_root, parent, forced)
    versions: list[str] = []
    for _, manifest, summary in stages:
        versions.append(
            register_stage_task(
                recipe_name, summary["stage"], manifest, versions[-1] if versions else None, parent
            )
        )
    if until == "train":
        return _stopped(parent, "train", builds=builds, stages=[s for _, _, s in stages], models=versions)
    final_manifest = stages[-1][1]
    export = _step("export", export_task, final_manifest["final"], parent, versions[-1])
    if until == "export":
        return _stopped(parent, "export", builds=builds, stages=[s for _, _, s in stages], models=versions,
                        export=str(export.out_dir))  # fmt: skip
    datasets = {b["spec"]: b["build_id"] for b in final_manifest["builds"]}
    types = quant_types or DEFAULT_QUANTS.get(recipe_name, PAPER_QUANTS)
    quants = [
        _step(f"quantize:{t}", quantize_task, recipe_name, export, t, parent, versions[-1], datasets)
        for t in types
    ]
    if until == "quantize":
        return _stopped(parent, "quantize", builds=builds, stages=[s for _, _, s in stages], models=versions,
                        export=str(export.out_dir), quants=quants)  # fmt: skip
    benches = [bench_task(q, pool, bench_timeout_s) for q in quants for pool in (pools or ["host-cpu"])]
    chart = device_chart_task(parent, runs_root)
    lineage = lineage_task(versions[-1], parent, runs_root)
    _finished(parent)
    return {
        "stopped_after": None,
        "parent_run_id": parent,
        "builds": builds,
        "stages": [s for _, _, s in stages],
        "models": versions,
        "export": str(export.out_dir),
        "quants": quants,
        "benchmarks": benches,
        "lineage": lineage,
        "device_chart": chart,
    }


def _stopped(parent: str, step: str, **done: Any) -> dict[str, Any]:
    """Summary of a retrain stopped after ``step`` (``until``); the retrain run is tagged with it."""
    from tasks.lineage import tracking

    mlflow = tracking.client()
    mlflow.set_tag(parent, tag.STOPPED_AFTER, step)
    mlflow.set_terminated(parent, "FINISHED")
    log.info("retrain stopped after step %r (until); rerun without it to continue", step)
    empty = {"builds": [], "stages": [], "models": [], "export": None, "quants": [], "benchmarks": [],
             "lineage": None, "device_chart": None}  # fmt: skip
    return {"stopped_after": step, "parent_run_id": parent, **empty, **done}


def _finished(parent: str) -> None:
    """Mark the retrain run finished (no longer stopped part way)."""
    from tasks.lineage import tracking

    mlflow = tracking.client()
    if tag.STOPPED_AFTER in mlflow.get_run(parent).data.tags:
        mlflow.delete_tag(parent, tag.STOPPED_AFTER)
    mlflow.set_terminated(parent, "FINISHED")


def _parent(recipe_name: str, data_root: str) -> str:
    from tasks.lineage import tracking
    from tasks.lineage.publish import parent_run

    return parent_run(tracking.client(), recipe_name, retrain_identity(recipe_name, data_root))
