"""Benchmark evaluations in MLflow: one child run per model x evaluation set, scores on the model
versions, the ``candidate`` and ``champion`` aliases, and the champion's scores read back.

Every call is idempotent (runs by identity tag, tags and aliases set to the same values), so a
resumed retrain points at what exists.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from tasks.lineage import tags as tag
from tasks.lineage import tracking
from tasks.quality.harness import BenchmarkRun

log = logging.getLogger(__name__)
CANDIDATE = "candidate"
"""Alias of the newest retrain's versions, whatever the gate said."""
CHAMPION = "champion"
"""Alias of the versions that last passed the gate (what ships)."""
SCORE_PREFIX = "mvlm.score."
"""``mvlm.score.<eval set>``: a model version's headline score on that set."""


def log_evaluation(mlflow: Any, run: BenchmarkRun, parent_run_id: str, model_version: str) -> str:
    """The child run of one evaluation: scores as metrics, answers and official files as artifacts,
    the evaluation set as a dataset input (digest = its content identity)."""
    run_id, created = tracking.run_for(
        mlflow, tracking.EXPERIMENT, f"eval/{run.identity}", f"eval {run.eval_set} {run.backend}",
        {tag.KIND: "benchmark-eval", tag.MODEL_VERSION: model_version, tag.EVAL_SET: run.eval_set,
         tag.BACKEND: run.backend},
        parent_run_id,
    )  # fmt: skip
    if created or tracking.unfinished(mlflow, run_id):  # every call below is idempotent
        tracking.log_params(mlflow, run_id, {"eval_set": run.eval_set, "benchmark": run.benchmark,
                                             "eval_identity": run.eval_identity, "backend": run.backend,
                                             "model": run.model, "questions": run.questions})  # fmt: skip
        tracking.log_dataset(mlflow, run_id, run.eval_set, run.eval_identity, run.folder, "evaluation")
        metrics = {"score": run.score.headline, "questions_per_s": run.questions_per_s, **run.score.metrics}
        tracking.log_summary(mlflow, run_id, {k.replace("|", "_"): float(v) for k, v in metrics.items()})
        mlflow.log_artifacts(run_id, run.folder, "predictions")
        mlflow.set_terminated(run_id, "FINISHED")
    return run_id


def _split(ref: str) -> tuple[str, str]:
    name, _, version = ref.rpartition("@")
    return name, version


def record_scores(mlflow: Any, model_version: str, scores: Mapping[str, float], description: str) -> None:
    """Put the scores on the model version (``mvlm.score.<set>`` tags) and describe it."""
    name, version = _split(model_version)
    for eval_set, value in scores.items():
        mlflow.set_model_version_tag(name, version, f"{SCORE_PREFIX}{eval_set}", f"{value:.4f}")
    mlflow.update_model_version(name, version, description=description)


def champion_scores(mlflow: Any, model_name: str) -> tuple[str | None, dict[str, float]]:
    """(``name@version``, scores) of the champion of ``model_name``; (None, {}) when there is none."""
    from mlflow.exceptions import MlflowException

    try:
        version = mlflow.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None, {}
    scores = {
        k.removeprefix(SCORE_PREFIX): float(v) for k, v in version.tags.items() if k.startswith(SCORE_PREFIX)
    }
    return f"{model_name}@{version.version}", scores


def move_aliases(mlflow: Any, versions: Sequence[str], passed: bool) -> list[str]:
    """``candidate`` on every version; ``champion`` too when the gate passed. Returns the aliases set."""
    moved = [CANDIDATE, CHAMPION] if passed else [CANDIDATE]
    for ref in versions:
        name, version = _split(ref)
        for alias in moved:
            mlflow.set_registered_model_alias(name, alias, version)
    return moved


def describe(recipe: str, stage: str, datasets: Mapping[str, str], scores: Mapping[str, float]) -> str:
    """A model version's description: recipe, stage, datasets and scores, one line each."""
    lines = [
        f"recipe {recipe}, {stage}",
        "datasets: " + ", ".join(f"{k} ({v[:8]})" for k, v in sorted(datasets.items())),
    ]
    if scores:
        lines.append("scores: " + ", ".join(f"{k} {v:.1f}" for k, v in scores.items()))
    return "\n".join(lines)


def evaluation_runs(mlflow: Any, parent_run_id: str) -> list[dict[str, Any]]:
    """The evaluation child runs of a retrain run: model version, set, backend and metrics."""
    kind = tag.search(tag.KIND, "benchmark-eval")
    runs = mlflow.search_runs(
        [tracking.experiment_id(mlflow)],
        filter_string=f"{tag.search('mlflow.parentRunId', parent_run_id)} and {kind}",
        max_results=1000,
    )
    return [{"run_id": r.info.run_id, "model_version": r.data.tags.get(tag.MODEL_VERSION, ""),
             "eval_set": r.data.tags.get(tag.EVAL_SET, ""), "backend": r.data.tags.get(tag.BACKEND, ""),
             "benchmark": r.data.params.get("benchmark", ""), "metrics": dict(r.data.metrics)}
            for r in runs]  # fmt: skip


def gate_tags(mlflow: Any, parent_run_id: str, passed: bool, failures: Sequence[str]) -> None:
    """The gate's verdict on the retrain run."""
    mlflow.set_tag(parent_run_id, tag.GATE, "PASS" if passed else "FAIL")
    mlflow.set_tag(parent_run_id, tag.GATE_FAILURES, json.dumps(list(failures))[:5000])
