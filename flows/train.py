"""Prefect flow ``train``: the recipe's stages in order, each a Ray Train job, then evaluation."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import flow, task
from prefect.cache_policies import NONE

from tasks.lineage import tags as tag
from tasks.train.recipes import Recipe, StageConfig

if TYPE_CHECKING:
    from tasks.train.stage import StageOutcome

log = logging.getLogger(__name__)


def stage_init(stage: StageConfig, previous_final: str | None, runs_root: str) -> dict[str, str]:
    """Where a stage starts: the recipe's explicit init (a folder or a hub model, fetched once), else
    the previous stage's output."""
    from tasks.train.init_source import resolve_init

    if stage.init == "scratch":
        return {"kind": "scratch", "path": ""}
    if stage.init:
        return {"kind": "checkpoint", "path": resolve_init(stage.init, Path(runs_root)), "named": stage.init}
    if previous_final is None:
        raise ValueError(f"stage {stage.name} has no init and no previous stage; set init in the recipe")
    return {"kind": "checkpoint", "path": previous_final}


@task(name="plan-stage", cache_policy=NONE)
def plan_stage_task(recipe: Recipe, stage: StageConfig, init: dict, data_root: str, runs_root: str,
                    parent_run_id: str | None = None,
                    known_builds: dict[str, str] | None = None) -> Any:  # fmt: skip
    """Check inputs, compute the stage identity, open (or find) its MLflow run."""
    from tasks.core.settings import get_settings
    from tasks.lineage import tracking
    from tasks.lineage.tracking import EXPERIMENT
    from tasks.train.stage import plan_stage

    plan, builds = plan_stage(recipe, stage, init, Path(data_root), Path(runs_root), None, known_builds)
    uri = get_settings().mlflow_uri
    mlflow = tracking.client(uri)
    run_id, created = tracking.run_for(
        mlflow, EXPERIMENT, plan.stage_id, f"{recipe.name}/{stage.name}",
        {tag.RECIPE: recipe.name, tag.STAGE: stage.name, tag.KIND: "stage"} | _init_tags(init), parent_run_id,
    )  # fmt: skip
    if created or tracking.unfinished(mlflow, run_id):  # idempotent: a crash may have cut it short
        tracking.log_params(
            mlflow, run_id, {"recipe": recipe.name, "stage": plan.stage, "steps": plan.total_steps}
        )
        for build in builds:
            tracking.log_dataset(mlflow, run_id, build.spec, build.build_id, build.path)
    return dataclasses.replace(plan, mlflow_uri=uri, mlflow_run_id=run_id)


def _init_tags(init: dict[str, str]) -> dict[str, str]:
    """The start point a recipe or ``--init`` named, and the folder it resolved to."""
    return {tag.INIT: init["named"], tag.INIT_PATH: init["path"]} if init.get("named") else {}


@task(name="run-stage", cache_policy=NONE)
def run_stage_task(plan: Any) -> dict[str, Any]:
    """Train (or reuse) the stage; marks its MLflow run finished or failed."""
    from tasks.lineage import tracking
    from tasks.train.stage import run_stage

    mlflow = tracking.client(plan.mlflow_uri)
    try:
        manifest = run_stage(plan)
    except Exception:
        mlflow.set_terminated(plan.mlflow_run_id, "FAILED")
        raise
    mlflow.set_terminated(plan.mlflow_run_id, "FINISHED")
    return manifest


@task(name="evaluate-stage", cache_policy=NONE)
def evaluate_task(plan: Any, manifest: dict[str, Any], question_types: dict) -> dict[str, Any]:
    """Held-out perplexity (text stages) or exact-match accuracy (instruction stages), logged to MLflow."""
    from tasks.core.identity import read_json
    from tasks.lineage import tracking
    from tasks.lineage.tracking import EXPERIMENT
    from tasks.train.evaluate import evaluate_checkpoint, pattern_classifier, write_result
    from tasks.train.stage import BuildRef, sources

    path = plan.out / "evaluation.json"
    if path.is_file():
        return read_json(path)
    builds = [BuildRef(**b) for b in plan.builds]
    kind = "text" if all(b.kind == "text" for b in builds) else "instruct"
    result = evaluate_checkpoint(  # per-type accuracies for the recipe's question types
        Path(manifest["final"]),
        sources(builds, "heldout"),
        kind,
        plan.stage["eval_samples"],
        pattern_classifier(question_types),
    )
    mlflow = tracking.client(plan.mlflow_uri)
    name = f"{plan.recipe}/{plan.stage['name']}/eval"
    tags = {tag.KIND: "evaluation", tag.STAGE_ID: plan.stage_id}
    parent = mlflow.get_run(plan.mlflow_run_id).data.tags.get("mlflow.parentRunId")
    run_id, _ = tracking.run_for(mlflow, EXPERIMENT, f"{plan.stage_id}/eval", name, tags, parent)
    tracking.log_summary(mlflow, run_id, result.metrics)  # exactly once, even if killed before the file
    mlflow.set_terminated(run_id, "FINISHED")
    write_result(result, path)
    return dataclasses.asdict(result)


def run_stages(
    recipe_name: str, only: str | None, data_root: str, runs_root: str, parent_run_id: str | None = None,
    force: tuple[str, ...] = (), known_builds: dict[str, str] | None = None,
    inits: dict[str, str] | None = None,
) -> list[StageOutcome]:  # fmt: skip
    """Plan and run the enabled stages in order.

    ``only`` runs one stage after finished predecessors; stages in ``force`` are retrained even when a
    finished output exists; ``known_builds`` (spec -> build folder) are the builds a retrain's data
    step just made, read without fingerprinting their sources again; ``inits`` (stage -> folder or hub
    id) start those stages from a checkpoint instead of the recipe's start point.
    """

    from tasks.train.recipes import get_recipe
    from tasks.train.stage import StageOutcome, StageSummary, finished_stage
    from tasks.train.stage_plan import StageError

    recipe = get_recipe(recipe_name, **{stage: {"init": where} for stage, where in (inits or {}).items()})
    stages = recipe.enabled_stages()
    if only is not None and only not in [s.name for s in stages]:
        raise StageError(
            f"recipe {recipe.name} has no enabled stage {only!r}; stages: {[s.name for s in stages]}"
        )
    done, previous = [], None
    for s in stages:
        plan = plan_stage_task(  # the tokenizer is the start checkpoint's (plan_stage finds it)
            recipe, s, stage_init(s, previous, runs_root), data_root, runs_root, parent_run_id, known_builds,
        )  # fmt: skip
        if only is not None and s.name != only:
            manifest = finished_stage(plan.out)
            if manifest is None:
                hint = f"run `mvlm train {recipe.name} --stage {s.name}`"
                raise StageError(f"stage {s.name} must finish before {only}: {hint}")
            previous = manifest["final"]
            continue
        if s.name in force and (plan.out / "stage.json").exists():
            log.info("forcing stage %s: removing %s", s.name, plan.out)
            shutil.rmtree(plan.out)
        reused = finished_stage(plan.out) is not None
        manifest = run_stage_task(plan)
        summary = StageSummary(
            s.name, plan.stage_id, reused, manifest["first_loss"], manifest["final_loss"], manifest["final"]
        )
        if s.name in recipe.evaluate:
            summary.evaluation = evaluate_task(plan, manifest, recipe.question_types)["metrics"]
        done.append(StageOutcome(plan, manifest, summary))
        previous = manifest["final"]
        if only is not None:
            break
    return done


@flow(name="train", flow_run_name="train-{recipe_name}")
def train(
    recipe_name: str, stage: str | None = None, data_root: str | None = None, runs_root: str | None = None
) -> list[dict[str, Any]]:
    """Run the recipe's enabled stages in order (``stage``: only that one, after finished predecessors)."""
    from tasks.core.settings import get_settings

    settings = get_settings()
    data_root = data_root or str(settings.data_root)
    runs_root = runs_root or str(settings.runs_root)
    return [dataclasses.asdict(o.summary) for o in run_stages(recipe_name, stage, data_root, runs_root)]
