"""The one MLflow client of the pipeline: connection, the run of an identity, params and metrics.

Every run is addressed by its identity tag (``tags.IDENTITY``) and there is one rule for which run
*is* the run of an identity (``canonical``): a complete one before an unfinished one, then the
earliest (start time, then run id). ``run_for`` looks it up before creating a run, so a rerun or a
resumed step reuses its run; the outbox (``tasks.lineage.push``) converges duplicates to the same
run. The tracking URI comes from ``MLFLOW_TRACKING_URI`` (default: SQLite under the work dir), read
at call time, never at import.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from tasks.core.nested import flatten as flat
from tasks.lineage import tags as tag

log = logging.getLogger(__name__)
EXPERIMENT = "mobilevlm"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
"""The MLflow UI's kind for training experiments (without it, 3.x opens the GenAI overview)."""
"""One experiment for every step, so the UI nests each retrain's steps under its parent run."""
MAX_PARAM = 500


def tracking_uri(uri: str | None = None) -> str:
    """``uri``, else ``MLFLOW_TRACKING_URI``, else SQLite under the work dir (tasks.core.settings)."""
    from tasks.core.settings import get_settings

    return uri or get_settings().mlflow_uri


def reachable(uri: str, timeout: float = 3.0) -> bool:
    """True for local stores; for an HTTP server, whether ``/health`` answers within ``timeout``."""
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


# SQLite stores this process has created or upgraded (keyed by pid, so a forked child checks again).
_READY_STORES: set[tuple[int, str]] = set()


def client(uri: str | None = None) -> Any:
    """An MlflowClient bound to ``uri`` (default from settings; nothing global is changed). A SQLite
    store is created or upgraded under a machine-wide lock per database."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(uri)
    if not uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=uri)
    # Two processes creating one SQLite store race in its migrations: the client (whose construction
    # may already open the store) and its first query, which creates or upgrades the schema, are made
    # under one lock per database.
    from tasks.core.locks import exclusive

    key = (os.getpid(), uri)
    db = Path(uri.removeprefix("sqlite:///"))
    if key in _READY_STORES and db.exists():  # made or upgraded by this process: no lock, no queries
        return MlflowClient(tracking_uri=uri)
    db.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(db.parent / f".{db.name}.init.lock"):
        mlflow = MlflowClient(tracking_uri=uri)
        mlflow.search_experiments(max_results=1)
        mlflow.search_registered_models(max_results=1)  # the registry's store, on the same database
    _READY_STORES.add(key)
    return mlflow


def experiment_id(mlflow: Any, name: str = EXPERIMENT) -> str:
    """The id of experiment ``name``, created if missing and marked as model training (the UI opens
    it on runs and models, not the GenAI traces view); a SQLite store keeps its artifacts beside the
    database (``mlartifacts/<name>``). Two processes may both find it missing: the loser's create
    fails on the unique name and it reads the winner's experiment instead."""
    from mlflow.exceptions import MlflowException

    found = mlflow.get_experiment_by_name(name)
    if found:
        if found.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # stores made before the kind was set
            mlflow.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return found.experiment_id
    uri = mlflow.tracking_uri
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts" / name).as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=location,
                                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})  # fmt: skip
    except MlflowException:  # another process created it in between
        found = mlflow.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def is_complete(run: Any) -> bool:
    """True for a run whose pushed payload is all in MLflow (``tags.COMPLETE``)."""
    return run.data.tags.get(tag.COMPLETE) == "true"


def canonical(run: Any) -> tuple[bool, int, str]:
    """Sort key of the one rule: complete runs first, then the earliest start, then the smallest id."""
    return (not is_complete(run), run.info.start_time or 0, run.info.run_id)


def runs_of(mlflow: Any, exp: str, identity: str) -> list[Any]:
    """Active runs of ``identity`` in experiment ``exp``, in ``canonical`` order."""
    runs = mlflow.search_runs([exp], filter_string=tag.search(tag.IDENTITY, identity), max_results=1000)
    return sorted(runs, key=canonical)


def find_run(mlflow: Any, exp: str, identity: str) -> Any | None:
    """The run of ``identity`` (the first in ``canonical`` order), or None."""
    runs = runs_of(mlflow, exp, identity)
    return runs[0] if runs else None


def run_for(
    mlflow: Any, experiment: str, identity: str, name: str, tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
) -> tuple[str, bool]:  # fmt: skip
    """(run id, created) of the run of ``identity`` in ``experiment``; created if none exists.

    Processes on one machine look up and create under a machine-wide lock per (store, identity), so
    only one creates. Across machines two may still both create: after creating, the run of the
    identity (``canonical``) is kept and a later copy is deleted by its creator.
    """

    from tasks.core.locks import exclusive

    exp = experiment_id(mlflow, experiment)
    key = hashlib.sha256(f"{mlflow.tracking_uri}|{exp}|{identity}".encode()).hexdigest()[:32]
    with exclusive(Path(tempfile.gettempdir()) / "mvlm-locks" / f"run-{key}.lock", timeout_s=600):
        found = find_run(mlflow, exp, identity)
        if found is not None:
            return found.info.run_id, False
        all_tags = {tag.IDENTITY: identity, **(tags or {})}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = mlflow.create_run(exp, run_name=name, tags=all_tags)
    keeper = find_run(mlflow, exp, identity)
    if keeper.info.run_id != run.info.run_id:
        log.info("run %s of %s lost a race to %s; deleting it", run.info.run_id, identity, keeper.info.run_id)
        mlflow.delete_run(run.info.run_id)
        return keeper.info.run_id, False
    return run.info.run_id, True


def flatten(data: dict[str, Any]) -> dict[str, str]:
    """Nested dict -> ``a.b.c`` keys with string values cut to MLflow's param length."""
    return {key: str(value)[:MAX_PARAM] for key, value in flat(data).items()}


def log_params(mlflow: Any, run_id: str, params: dict[str, Any]) -> None:
    """Log (flattened) params once; params already present are left as they are."""
    from mlflow.entities import Param

    existing = mlflow.get_run(run_id).data.params
    items = [Param(k, v) for k, v in flatten(params).items() if k not in existing]
    for i in range(0, len(items), 100):
        mlflow.log_batch(run_id, params=items[i : i + 100])


def log_dataset(
    mlflow: Any, run_id: str, name: str, digest: str, source: str, context: str = "training"
) -> None:
    """Log a dataset build as a run input (digest = build identity, source = shard location)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    dataset = Dataset(name=name, digest=digest, source_type="local", source=source)
    mlflow.log_inputs(
        run_id, datasets=[DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])]
    )


def log_metrics(
    mlflow: Any,
    run_id: str,
    rows: list[dict[str, float]],
    after_step: int = -1,
    timestamp_ms: int | None = None,
) -> int:
    """Log metric rows (each with a ``step``) whose step is above ``after_step``; returns the last step.

    With a fixed ``timestamp_ms`` a repeated call is a no-op (MLflow drops a metric whose key, step,
    value and timestamp all exist), which is how one-off summaries stay exactly once across crashes.
    """

    from mlflow.entities import Metric

    now = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    metrics = [
        Metric(key, float(value), now, int(row["step"]))
        for row in rows
        if row["step"] > after_step
        for key, value in row.items()
        if key != "step"
    ]
    for i in range(0, len(metrics), 500):
        mlflow.log_batch(run_id, metrics=metrics[i : i + 500])
    return max([after_step, *(int(r["step"]) for r in rows)])


def log_summary(mlflow: Any, run_id: str, values: dict[str, float]) -> None:
    """Step-0 metrics stamped with the run's start time, so logging them again changes nothing."""
    start = mlflow.get_run(run_id).info.start_time
    log_metrics(mlflow, run_id, [{"step": 0, **values}], timestamp_ms=start)


def unfinished(mlflow: Any, run_id: str) -> bool:
    """True unless the run is FINISHED (a run a crash left RUNNING still needs its logging)."""
    return mlflow.get_run(run_id).info.status != "FINISHED"


def last_logged_step(mlflow: Any, run_id: str, key: str = "loss") -> int:
    """Highest step logged for ``key`` (-1 when none)."""
    history = mlflow.get_metric_history(run_id, key)
    return max((m.step for m in history), default=-1)
