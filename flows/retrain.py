"""Prefect flow ``retrain``: data, stages, evaluation, export, quantization, device benchmarks.

Every step is reused by identity when its inputs did not change, so a second run with nothing new
finishes in seconds and says what it reused. A failure names the step; everything finished before it
stays, and the next run continues from there. All steps are MLflow child runs of one parent run.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from prefect import flow, task
from prefect.cache_policies import NONE

from flows.quality import compare_task, evaluate_task, gate_task, scorecard_task
from tasks.lineage import tags as tag

if TYPE_CHECKING:
    from tasks.train.recipes import Recipe

log = logging.getLogger(__name__)
Step = Literal["data", "train", "export", "quantize", "evaluate", "benchmark"]
STEPS: tuple[str, ...] = ("data", "train", "export", "quantize", "evaluate", "benchmark")
"""The retrain's steps in order; ``until`` stops after one of them."""


class RetrainError(RuntimeError):
    """A retrain step failed; the message names the step."""


def retrain_identity(recipe: Recipe, builds: dict[str, str]) -> str:
    """Hash of the recipe's enabled stages, the build id of every spec they read and the code versions."""
    from tasks.core.identity import CODE_VERSIONS, hash_json
    from tasks.train.recipes import stage_dict

    return hash_json(
        {"recipe": [stage_dict(s) for s in recipe.enabled_stages()], "builds": builds, "code": CODE_VERSIONS}
    )


@dataclass
class RetrainSummary:
    """What a retrain did, step by step (the flow returns it as a dict)."""

    parent_run_id: str = ""
    """The retrain's MLflow run (every step is a child run of it)."""
    stopped_after: str | None = None
    """The step ``until`` stopped after (None: every step ran)."""
    builds: list[dict[str, Any]] = field(default_factory=list)
    """``BuildSummary`` of every spec the stages read."""
    stages: list[dict[str, Any]] = field(default_factory=list)
    """``StageSummary`` of every enabled stage, in order."""
    models: list[str] = field(default_factory=list)
    """Registered ``name@version`` of every stage's output."""
    export: str | None = None
    """GGUF export folder."""
    quants: list[dict[str, Any]] = field(default_factory=list)
    """Quantizations: type, MLflow run, model version, bytes, GGUF path."""
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    """The recipe's benchmarks per model (PyTorch first, then each quantization): scores and runs."""
    gate: dict[str, Any] | None = None
    """The gate's verdict: passed, failures, aliases moved, the champion before this retrain."""
    scorecard: dict[str, str] | None = None
    """Scorecard files (html, png, json), also artifacts of the retrain run."""
    benchmarks: list[dict[str, Any]] = field(default_factory=list)
    """Device benchmark results (or why they are pending) per quantization and pool."""
    lineage: str | None = None
    """HTML lineage graph of the final model."""
    device_chart: str | None = None
    """Chart of our device results beside the paper's."""


@task(name="publish-build", cache_policy=NONE)
def publish_build_task(summary: dict[str, Any], parent_run_id: str) -> str:
    """The build's MLflow child run."""
    from tasks.lineage import tracking
    from tasks.lineage.publish import log_build

    return log_build(tracking.client(), summary, parent_run_id)


@task(name="register-stage", cache_policy=NONE)
def register_stage_task(
    name: str, recipe: str, stage: str, manifest: dict, parent_model: str | None, retrain_run: str
) -> str:
    """Registered model version of a stage output."""
    from tasks.lineage import tracking
    from tasks.lineage.publish import register_stage

    return register_stage(tracking.client(), name, recipe, stage, manifest, parent_model, retrain_run)


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
    recipe: Recipe, export: Any, quant_type: str, parent_run_id: str, parent_model: str,
    datasets: dict[str, str],
) -> dict[str, Any]:  # fmt: skip
    """llama.cpp quantization logged to MLflow and registered as a model version."""
    from tasks.lineage import tracking
    from tasks.lineage.publish import register_quant
    from tasks.lineage.quant_artifacts import log_quant
    from tasks.ship.quantize import quantize

    quant = quantize(export.llm, quant_type)
    run_id = log_quant(quant)
    name = recipe.model_name(quant_type)
    ref = register_quant(
        tracking.client(), name, recipe.name, quant, run_id, parent_run_id, parent_model, datasets
    )
    return {"quant_type": quant_type, "run_id": run_id, "model_version": ref, "bytes": _size(quant.out_dir),
            "gguf": str(quant.llm)}  # fmt: skip


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
    inits: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Build or reuse data, train, evaluate, export, quantize and benchmark one recipe.

    ``from_stage`` retrains that stage and every later one; ``force`` names stages to retrain;
    ``pools`` are device work pools to benchmark on (default host-cpu); ``quant_types`` default to
    the recipe's (``quant_types`` in its file: the paper's q4_k_s+q8_0 unless it says otherwise).
    ``until`` stops after that step (``data``, ``train``, ``export``, ``quantize``, ``evaluate``;
    default: run everything): the summary's
    ``stopped_after`` says where, and a rerun without it continues from there (reusing what exists).
    ``inits`` (stage -> checkpoint folder or hub model id) start those stages from that checkpoint.

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
            recipe_name, from_stage, force, pools, quant_types, bench_timeout_s, data_root, runs_root, until,
            inits or {},
        )  # fmt: skip


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
    inits: dict[str, str],
) -> dict[str, Any]:
    """The steps of ``retrain``, in order, with the recipe's lock held."""
    from flows.data import build_data
    from flows.train import run_stages
    from tasks.core.settings import get_settings
    from tasks.train.recipes import get_recipe

    settings = get_settings()
    data_root, runs_root = data_root or str(settings.data_root), runs_root or str(settings.runs_root)
    recipe = get_recipe(recipe_name, **{stage: {"init": where} for stage, where in inits.items()})
    forced = recipe.stages_to_retrain(from_stage, force or ())
    done = RetrainSummary()
    specs = sorted({d.spec for s in recipe.enabled_stages() for d in s.datasets})
    done.builds = [_step(f"data:{spec}", build_data, spec, data_root=data_root) for spec in specs]
    build_ids = {b["name"]: b["build_id"] for b in done.builds}
    done.parent_run_id = parent = _step("parent-run", _parent, recipe, build_ids)
    for summary in done.builds:
        publish_build_task(summary, parent)
    if until == "data":
        return _stopped(done, "data")
    known = {b["name"]: b["path"] for b in done.builds}  # each source was fingerprinted once, above
    stages = _step("train", run_stages, recipe_name, None, data_root, runs_root, parent, forced, known, inits)
    done.stages = [dataclasses.asdict(s.summary) for s in stages]
    for s in stages:
        previous = done.models[-1] if done.models else None
        name = recipe.model_name(s.summary.stage)
        done.models.append(
            register_stage_task(name, recipe_name, s.summary.stage, s.manifest, previous, parent)
        )
    if until == "train":
        return _stopped(done, "train")
    final = stages[-1].manifest
    export = _step("export", export_task, final["final"], parent, done.models[-1])
    done.export = str(export.out_dir)
    if until == "export":
        return _stopped(done, "export")
    datasets = {b["spec"]: b["build_id"] for b in final["builds"]}
    done.quants = [
        _step(f"quantize:{t}", quantize_task, recipe, export, t, parent, done.models[-1], datasets)
        for t in quant_types or recipe.quant_types
    ]
    if until == "quantize":
        return _stopped(done, "quantize")
    if recipe.eval_sets:
        models = [("pytorch", final["final"], done.models[-1])]
        models += [(q["quant_type"], q["gguf"], q["model_version"]) for q in done.quants]
        done.evaluations = [
            _step(f"evaluate:{label}", evaluate_task, recipe, label, path, ref, parent, data_root, runs_root)
            for label, path, ref in models
        ]
        done.evaluations = _step("compare-backends", compare_task, done.evaluations)
        done.gate = _step("gate", gate_task, recipe, done.evaluations, datasets, parent)
    if until == "evaluate":
        return _stopped(done, "evaluate")
    done.benchmarks = [
        bench_task(q, pool, bench_timeout_s) for q in done.quants for pool in pools or ["host-cpu"]
    ]
    if done.evaluations:
        done.scorecard = scorecard_task(dataclasses.asdict(done), recipe_name, runs_root)
    done.device_chart = device_chart_task(parent, runs_root)
    done.lineage = lineage_task(done.models[-1], parent, runs_root)
    _finished(parent)
    return dataclasses.asdict(done)


def _stopped(done: RetrainSummary, step: str) -> dict[str, Any]:
    """Summary of a retrain stopped after ``step`` (``until``); the retrain run is tagged with it."""
    from tasks.lineage import tracking

    mlflow = tracking.client()
    mlflow.set_tag(done.parent_run_id, tag.STOPPED_AFTER, step)
    mlflow.set_terminated(done.parent_run_id, "FINISHED")
    log.info("retrain stopped after step %r (until); rerun without it to continue", step)
    done.stopped_after = step
    return dataclasses.asdict(done)


def _finished(parent: str) -> None:
    """Mark the retrain run finished (no longer stopped part way)."""
    from tasks.lineage import tracking

    mlflow = tracking.client()
    if tag.STOPPED_AFTER in mlflow.get_run(parent).data.tags:
        mlflow.delete_tag(parent, tag.STOPPED_AFTER)
    mlflow.set_terminated(parent, "FINISHED")


def _parent(recipe: Recipe, builds: dict[str, str]) -> str:
    from tasks.lineage import tracking
    from tasks.lineage.publish import parent_run

    return parent_run(tracking.client(), recipe.name, retrain_identity(recipe, builds))
