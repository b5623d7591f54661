"""The retrain's quality steps: the recipe's benchmarks asked of the final model and of every
quantization, the gate and the aliases it moves, and the scorecard on the retrain run."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import task
from prefect.cache_policies import NONE

if TYPE_CHECKING:
    from tasks.train.recipes import Recipe


@task(name="evaluate-benchmarks", cache_policy=NONE)
def evaluate_task(
    recipe: Recipe, label: str, model_path: str, model_version: str, parent_run_id: str, data_root: str,
    runs_root: str,
) -> dict[str, Any]:  # fmt: skip
    """The recipe's evaluation sets asked of one model (checkpoint or GGUF), each set a child run."""
    from tasks.lineage import tracking
    from tasks.lineage.quality_runs import evaluation_entry, log_evaluation
    from tasks.quality.backends import resolve_model
    from tasks.quality.eval_specs import find_eval_spec
    from tasks.quality.harness import evaluate_model

    specs = [find_eval_spec(name)[1] for name in recipe.eval_sets]
    template = recipe.enabled_stages()[-1].template or "v1"
    ref = resolve_model(model_path)
    runs = evaluate_model(ref, specs, Path(data_root), Path(runs_root) / "eval", template)
    mlflow = tracking.client()
    run_ids = [log_evaluation(mlflow, run, parent_run_id, model_version) for run in runs]
    return evaluation_entry(label, model_version, runs, run_ids)


@task(name="compare-backends", cache_policy=NONE)
def compare_task(evaluations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The evaluations with each quantization's agreement with the PyTorch answers added."""
    from tasks.lineage import tracking
    from tasks.lineage.quality_runs import compare_backends

    compare_backends(tracking.client(), evaluations)
    return evaluations


@task(name="gate", cache_policy=NONE)
def gate_task(
    recipe: Recipe, evaluations: list[dict[str, Any]], datasets: dict[str, str], parent_run_id: str
) -> dict[str, Any]:
    """The gate's verdict; ``candidate`` moves to the new versions, ``champion`` only on a pass."""
    from tasks.lineage import tracking
    from tasks.lineage.quality_runs import decide, describe

    final = recipe.enabled_stages()[-1].name
    descriptions = {e["model"]: describe(recipe.name, final if e["model"] == "pytorch"
                                         else f"GGUF {e['model']} of {final}", datasets)
                    for e in evaluations}  # fmt: skip
    return decide(tracking.client(), recipe.gate, evaluations, descriptions, parent_run_id)


@task(name="scorecard", cache_policy=NONE)
def scorecard_task(summary: dict[str, Any], recipe_name: str, runs_root: str) -> dict[str, str]:
    """The scorecard (HTML, PNG and its rows as JSON) as artifacts of the retrain run."""
    from tasks.core.identity import atomic_write_json
    from tasks.lineage import tracking
    from tasks.quality.scorecard import write_scorecard

    gate = summary.get("gate") or {}
    rows = scorecard_rows(summary)
    parent = summary["parent_run_id"]
    folder = Path(runs_root) / "reports"
    stem = f"scorecard-{recipe_name}-{parent[:8]}"
    page, png = write_scorecard(rows, folder, stem, f"{recipe_name} retrain {parent[:8]}", verdict(gate))
    data = atomic_write_json(folder / f"{stem}.json", {"gate": gate, "rows": [row.__dict__ for row in rows]})
    mlflow = tracking.client()
    for path in (page, png, data):
        mlflow.log_artifact(parent, str(path), "scorecard")
    return {"html": str(page), "png": str(png), "json": str(data)}


def scorecard_rows(summary: dict[str, Any]) -> list[Any]:
    """The scorecard rows of a retrain summary: its models, the champion before it, the papers'."""
    from tasks.quality.scorecard import rows_for

    gate = summary.get("gate") or {}
    champion = {"model_version": gate.get("champion_before"), "scores": gate.get("champion_scores")}
    return rows_for(summary["evaluations"], summary["quants"], summary["benchmarks"], champion)


def verdict(gate: dict[str, Any]) -> str:
    """One line: PASS, or FAIL and which thresholds failed."""
    if not gate:
        return ""
    if gate["passed"]:
        return f"gate PASS ({gate['checks']} checks); aliases {', '.join(gate['aliases'])} moved"
    return "gate FAIL: " + "; ".join(gate["failures"]) + " (champion unchanged)"
