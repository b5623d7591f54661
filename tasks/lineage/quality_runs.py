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
    """Put the scores on the model version (``mvlm.score.<set>`` tags) and its description."""
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


def describe(recipe: str, what: str, datasets: Mapping[str, str]) -> str:
    """The first lines of a model version's description: recipe and stage, the datasets it saw."""
    seen = ", ".join(f"{k} ({v[:8]})" for k, v in sorted(datasets.items()))
    return f"recipe {recipe}, {what}\ndatasets: {seen}"


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


def evaluation_entry(label: str, model_version: str, runs: Sequence[BenchmarkRun],
                     run_ids: Sequence[str]) -> dict[str, Any]:  # fmt: skip
    """One model's evaluations as the retrain summary keeps them."""
    return {"model": label, "model_version": model_version, "backend": runs[0].backend if runs else "",
            "runs": [{"eval_set": r.eval_set, "benchmark": r.benchmark, "score": r.score.headline,
                      "questions": r.questions, "questions_per_s": r.questions_per_s, "run_id": run_id,
                      "folder": r.folder} for r, run_id in zip(runs, run_ids, strict=True)]}  # fmt: skip


def decide(
    mlflow: Any, gate: Any, evaluations: Sequence[Mapping[str, Any]], descriptions: Mapping[str, str],
    parent_run_id: str,
) -> dict[str, Any]:  # fmt: skip
    """Apply the recipe's gate to a retrain's evaluations (the first is the PyTorch model, the rest
    its quantizations) against the champion before it; record scores and descriptions on the
    versions, move ``candidate`` (and ``champion`` on a pass) and tag the retrain run."""
    from tasks.quality.gate import check_gate

    final = evaluations[0]
    name, _ = _split(final["model_version"])
    before, champion = champion_scores(mlflow, name)
    if before == final["model_version"]:  # a rerun of the retrain that made the champion
        before, champion = None, {}
    benchmarks = {run["eval_set"]: run["benchmark"] for e in evaluations for run in e["runs"]}
    scores = {e["model"]: {run["eval_set"]: run["score"] for run in e["runs"]} for e in evaluations}
    quants = {label: s for label, s in scores.items() if label != final["model"]}
    champion = {k: v for k, v in champion.items() if k in benchmarks}
    result = check_gate(gate, benchmarks, scores[final["model"]], quants, champion or None)
    for entry in evaluations:
        own = scores[entry["model"]]
        line = ", ".join(f"{k} {v:.1f}" for k, v in own.items())
        record_scores(
            mlflow, entry["model_version"], own, f"{descriptions.get(entry['model'], '')}\nscores: {line}"
        )
    aliases = move_aliases(mlflow, [e["model_version"] for e in evaluations], result.passed)
    gate_tags(mlflow, parent_run_id, result.passed, result.failures)
    return {"passed": result.passed, "failures": result.failures, "checks": result.checks, "aliases": aliases,
            "champion_before": before,
            "champion_scores": {benchmarks[k]: v for k, v in champion.items()}}  # fmt: skip


class ScorecardNotFound(LookupError):
    """No retrain run or scorecard for what the user named."""


def retrain_run_of(mlflow: Any, target: str | None) -> str:
    """The retrain run a scorecard target names: a run id, ``name@version`` or ``name@alias`` of a
    model it registered, or (None) the latest retrain run that has a scorecard."""
    from mlflow.exceptions import MlflowException

    if target is None:
        retrains = tag.search(tag.KIND, "retrain")
        runs = mlflow.search_runs([tracking.experiment_id(mlflow)], filter_string=retrains,
                                  order_by=["attributes.start_time DESC"], max_results=50)  # fmt: skip
        for run in runs:
            if tag.GATE in run.data.tags:
                return run.info.run_id
        raise ScorecardNotFound("no retrain has a scorecard yet: run `mvlm retrain RECIPE` with eval_sets")
    if "@" not in target:
        try:
            return mlflow.get_run(target).info.run_id
        except MlflowException:
            raise ScorecardNotFound(f"no run {target!r}: pass a retrain run id or MODEL@VERSION") from None
    name, version = _split(target)
    try:
        found = (mlflow.get_model_version(name, version) if version.isdigit()
                 else mlflow.get_model_version_by_alias(name, version))  # fmt: skip
    except MlflowException:
        raise ScorecardNotFound(f"no registered model version {target!r} (`mvlm lineage {name}` lists "
                                "what exists)") from None  # fmt: skip
    run_id = found.tags.get(tag.RETRAIN_RUN_ID)
    if not run_id:
        raise ScorecardNotFound(f"{target} was not registered by a retrain (no {tag.RETRAIN_RUN_ID} tag)")
    return run_id


def scorecard_data(mlflow: Any, run_id: str, folder: str) -> dict[str, Any]:
    """The scorecard JSON artifact of a retrain run (gate and rows), downloaded into ``folder``."""
    files = [a.path for a in mlflow.list_artifacts(run_id, "scorecard") if a.path.endswith(".json")]
    if not files:
        raise ScorecardNotFound(f"retrain run {run_id} has no scorecard (its recipe names no eval_sets, or "
                                "it stopped before the evaluate step)")  # fmt: skip
    path = mlflow.download_artifacts(run_id, files[0], folder)
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def compare_backends(mlflow: Any, evaluations: Sequence[dict[str, Any]]) -> None:
    """Each quantization's answers against the PyTorch model's on the same questions: ``vs_pytorch``
    in its summary entries and ``vs_pytorch.*`` metrics on its evaluation runs."""
    from tasks.quality.harness import agreement

    reference = {run["eval_set"]: run for run in evaluations[0]["runs"]}
    for entry in evaluations[1:]:
        for run in entry["runs"]:
            run["vs_pytorch"] = agreement(reference[run["eval_set"]]["folder"], run["folder"])
            tracking.log_summary(
                mlflow, run["run_id"], {f"vs_pytorch.{k}": v for k, v in run["vs_pytorch"].items()}
            )
