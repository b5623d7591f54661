"""Results into MLflow exactly once, through an on-disk outbox; quantized artifacts in and out of MLflow.

A result to send is a ``Payload`` (identity, tags, params, metrics with their timestamps, small
JSON artifacts). ``Outbox.put`` writes it atomically as ``<runs_root>/outbox/<identity>.json``
before anything is sent; ``flush`` pushes every pending payload and deletes its file only once the
run is complete in MLflow. ``push`` is idempotent: it looks the run up by the ``mvlm.identity`` tag
before creating one (the tag is set in the same request that creates the run), re-sends metrics
with their original timestamps (MLflow drops exact duplicates) and marks the run complete last.
So a server that dies mid-push and comes back ends with exactly one complete run per identity.

Many pushers at once (several flow runs on one runner sharing its outbox, runners on several
machines, HTTP retries of a create whose answer was lost) cannot rely on look-up-then-create alone:
two of them can both find no run and both create one. Two rules make them converge:

* on one machine, a payload is sent under a per-identity ``flock`` in the outbox folder, so
  processes sharing an outbox never send the same payload at the same time (the second one waits
  and reports the first one's run);
* across machines, every pusher tags the runs it creates with its owner (host and outbox) and only
  ever writes into its own runs. After marking its run complete it looks again: of the complete
  runs of the identity, the first in ``tracking.canonical`` order (start time, then run id) is
  kept, the other complete ones are deleted, and so are its own incomplete runs (orphans of a
  create whose answer was lost: MLflow's client retries POSTs too). A complete run is only deleted
  while a complete run before it in that order exists, and an incomplete one only by its owner, one
  pusher per owner at a time (the lock), so the first complete run is never deleted; the last
  pusher to look sees every complete copy, so exactly one remains.

Quantized GGUFs travel through MLflow too (``tasks.lineage.quant_artifacts``), under the same
open-a-run and converge rules.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.core.identity import atomic_write_json, read_json
from tasks.core.locks import claimed
from tasks.core.settings import get_settings
from tasks.lineage import tags as tag
from tasks.lineage.tracking import (
    EXPERIMENT,
    client,
    experiment_id,
    find_run,
    is_complete,
    reachable,
    runs_of,
    tracking_uri,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run


log = logging.getLogger(__name__)

LOCK_WAIT_S = 120.0
"""How long ``flush`` waits for another process that is sending the same payload."""


class MlflowUnavailable(ConnectionError):
    """The tracking server cannot be reached (results stay in the outbox)."""


def default_owner() -> str:
    """Owner tag of runs created by ``push`` called directly: this process. Only a pusher that holds a
    lock for the identity may share an owner across processes (``flush``: the outbox folder under its
    per-identity lock; ``log_quant``: the host under a lock beside the quant), because a pusher
    deletes its owner's incomplete runs once a complete one exists."""
    return f"{socket.gethostname()}:pid{os.getpid()}"


def _open_run(
    mlflow: MlflowClient, exp_id: str, identity: str, owner: str, create: Callable[[dict[str, str]], Run]
) -> tuple[Run, bool]:
    """(run to write into, whether it is complete already): a complete run of the identity, else one
    this owner created before (a push that stopped half way), else a new one."""
    runs = runs_of(mlflow, exp_id, identity)
    complete = [r for r in runs if is_complete(r)]
    if complete:
        return complete[0], True
    mine = [r for r in runs if r.data.tags.get(tag.OWNER) == owner]
    if mine:
        return mine[0], False
    return create({tag.IDENTITY: identity, tag.OWNER: owner}), False


def _converge(mlflow: MlflowClient, exp_id: str, identity: str, owner: str) -> str:
    """After completing a run: keep the first complete run (``tracking.canonical`` order); delete the
    other complete copies and this owner's incomplete runs; return the kept run's id."""
    runs = runs_of(mlflow, exp_id, identity)
    complete = [r for r in runs if is_complete(r)]
    if not complete:
        raise RuntimeError(f"no complete MLflow run carries identity {identity} after pushing it")
    keep = complete[0].info.run_id
    for run in runs:
        if run.info.run_id == keep or not (is_complete(run) or run.data.tags.get(tag.OWNER) == owner):
            continue  # another owner's incomplete run: that pusher cleans it up when it looks again
        log.warning("identity %s: removing duplicate run %s (keeping %s)", identity, run.info.run_id, keep)
        try:
            if run.info.status == "RUNNING":
                mlflow.set_terminated(run.info.run_id, "KILLED")
            mlflow.delete_run(run.info.run_id)
        except Exception as err:  # a concurrent pusher may have removed it already
            if auth_refusal(err):  # a runner account may not delete runs: an admin removes the copy
                log.warning(
                    "identity %s: this account may not delete run %s; an admin can", identity, run.info.run_id
                )
            else:
                log.debug("identity %s: run %s not removed: %s", identity, run.info.run_id, err)
    return keep


def auth_refusal(err: BaseException) -> str | None:
    """``UNAUTHENTICATED`` or ``PERMISSION_DENIED`` when ``err`` is an MLflow server refusing the
    caller's credentials or rights, else None."""
    code = getattr(err, "error_code", None)
    return code if code in ("UNAUTHENTICATED", "PERMISSION_DENIED") else None


# --- payloads and the outbox --------------------------------------------------------------------------


@dataclass
class Payload:
    """One result to record as one MLflow run."""

    identity: str
    """Identity of the result (``mvlm.identity`` tag): what makes pushes idempotent."""
    run_name: str
    """Run name shown in the UI."""
    tags: dict[str, str] = field(default_factory=dict)
    """Tags (device, soc, backend, threads, quant type, llama.cpp build, runner host, links)."""
    params: dict[str, str] = field(default_factory=dict)
    """Parameters (settings of the measurement)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Metrics, logged at ``timestamp_ms``."""
    artifacts: dict[str, Any] = field(default_factory=dict)
    """Small JSON artifacts by file name."""
    experiment: str = EXPERIMENT
    """Experiment name."""
    timestamp_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    """When the result was measured; fixed so re-sent metrics are exact duplicates."""


class Outbox:
    """Pending payloads on disk, one atomically written JSON file per identity.

    Several processes may share one outbox (flow runs of one runner): each payload is sent under an
    ``flock`` on ``.<identity>.lock`` beside it, removed again once the payload is handled.
    """

    def __init__(self, folder: str | Path | None = None) -> None:
        self.folder = Path(folder) if folder else get_settings().runs_root / "outbox"

    @property
    def owner(self) -> str:
        """Owner tag of the runs this outbox's pushes create (host and outbox folder)."""
        return f"{socket.gethostname()}:{self.folder.absolute()}"

    def put(self, payload: Payload) -> Path:
        """Store ``payload`` (replacing a pending one with the same identity)."""
        return atomic_write_json(self.folder / f"{payload.identity}.json", dataclasses.asdict(payload))

    def get(self, identity: str) -> Payload | None:
        """The pending payload of ``identity`` (None once it was sent)."""
        try:
            return Payload(**read_json(self.folder / f"{identity}.json"))
        except FileNotFoundError:
            return None

    def pending(self) -> list[Payload]:
        """Every stored payload, oldest first (one another process sends meanwhile is skipped)."""
        if not self.folder.is_dir():
            return []
        found = []
        for path in self.folder.glob("*.json"):
            with contextlib.suppress(FileNotFoundError):
                found.append((path.stat().st_mtime_ns, path.name, Payload(**read_json(path))))
        return [payload for *_, payload in sorted(found, key=lambda entry: entry[:2])]

    def remove(self, identity: str) -> None:
        """Forget a payload once MLflow has it."""
        (self.folder / f"{identity}.json").unlink(missing_ok=True)

    @contextlib.contextmanager
    def claim(self, identity: str, wait_s: float = 0.0) -> Iterator[bool]:
        """Hold ``identity``'s send lock; yields False when another process held it for ``wait_s``."""
        with claimed(self.folder / f".{identity}.lock", wait_s) as held:
            yield held


@dataclass
class FlushReport:
    """What a flush did."""

    sent: dict[str, str] = field(default_factory=dict)
    """Identity -> run id of payloads now complete in MLflow."""
    kept: list[str] = field(default_factory=list)
    """Identities still waiting (server unreachable, credentials refused or a push failed)."""
    refused: str | None = None
    """Why the server refused this account (then nothing more was tried), or None."""


def flush(
    outbox: Outbox,
    uri: str | None = None,
    on_step: Callable[[str], None] | None = None,
    wait_s: float = LOCK_WAIT_S,
) -> FlushReport:
    """Push every pending payload; keep the ones that could not be sent.

    A payload another process is sending right now is waited for (up to ``wait_s``, after the
    others) and reported with that process's run. Once a push fails and the server stops answering,
    the remaining payloads are kept without trying.
    """
    uri = tracking_uri(uri)
    report = FlushReport()
    pending = outbox.pending()
    if pending and not reachable(uri):
        log.warning("MLflow at %s is unreachable; %d result(s) stay in %s", uri, len(pending), outbox.folder)
        report.kept = [p.identity for p in pending]
        return report
    busy: list[Payload] = []
    for payload in pending:
        if report.refused or (report.kept and not reachable(uri)):
            report.kept.append(payload.identity)
        elif not _flush_one(outbox, payload, uri, on_step, 0.0, report):
            busy.append(payload)
    if report.refused:
        log.error("%s; %d result(s) stay in %s", report.refused, len(report.kept), outbox.folder)
        return report
    for payload in busy:
        if not _flush_one(outbox, payload, uri, on_step, wait_s, report):
            log.warning(
                "%s is still being sent by another process; kept in %s", payload.identity, outbox.folder
            )
            report.kept.append(payload.identity)
    return report


def _flush_one(
    outbox: Outbox, seen: Payload, uri: str, on_step: Callable[[str], None] | None, wait_s: float,
    report: FlushReport,
) -> bool:  # fmt: skip
    """Send one payload under its lock; False when another process held the lock for ``wait_s``."""
    with outbox.claim(seen.identity, wait_s) as held:
        if not held:
            return False
        payload = outbox.get(seen.identity)  # the newest copy, or None: sent meanwhile
        if payload is None:
            with contextlib.suppress(Exception):
                mlflow = client(uri)
                run = find_run(mlflow, experiment_id(mlflow, seen.experiment), seen.identity)
                if run is not None and is_complete(run):
                    report.sent[seen.identity] = run.info.run_id
            return True
        try:
            run_id = push(payload, uri, on_step, owner=outbox.owner)
        except Exception as err:
            if code := auth_refusal(err):
                log.debug("MLflow refused the push of %s", payload.identity, exc_info=True)
                report.refused = refusal_message(uri, code)
            else:
                log.warning("push of %s failed (%s); kept in %s", payload.identity, err, outbox.folder)
            report.kept.append(payload.identity)
            return True
        outbox.remove(payload.identity)
        report.sent[payload.identity] = run_id
        return True


def refusal_message(uri: str, code: str) -> str:
    """What to do when the server at ``uri`` refuses this account (``auth_refusal``'s code)."""
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if code == "UNAUTHENTICATED":
        who = f"the password of {user!r}" if user else "no credentials (MLFLOW_TRACKING_USERNAME is not set)"
        return (
            f"MLflow at {uri} refused {who}: set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD "
            "to a runner account"
        )
    return (
        f"MLflow at {uri} does not let {user!r} write to the pipeline's experiment: an admin runs "
        f"`mvlm servers add-runner {user}` (infra/servers/README.md)"
    )


def push(
    payload: Payload, uri: str, on_step: Callable[[str], None] | None = None, owner: str | None = None
) -> str:
    """Record ``payload`` as one complete run (idempotent); return the run id.

    ``owner`` names the pusher (``Outbox.owner`` when called by ``flush``): a push that stopped half
    way continues in the run its owner created.
    """
    from mlflow.entities import Metric, Param, RunTag

    from tasks.core import faults

    def step(name: str) -> None:
        faults.hit("mlflow-push")  # chaos testing: a kill between the requests of one push
        if on_step:
            on_step(name)

    owner = owner or default_owner()
    mlflow = client(uri)
    exp_id = experiment_id(mlflow, payload.experiment)

    def create(tags: dict[str, str]) -> Run:
        tags = {**payload.tags, **tags, "mlflow.runName": payload.run_name}
        return mlflow.create_run(
            exp_id, start_time=payload.timestamp_ms, tags=tags, run_name=payload.run_name
        )

    run, complete = _open_run(mlflow, exp_id, payload.identity, owner, create)
    if complete:
        log.info("result %s is already in MLflow (run %s)", payload.identity, run.info.run_id)
        return _converge(mlflow, exp_id, payload.identity, owner)
    run_id = run.info.run_id
    step("created")
    metrics = [Metric(k, float(v), payload.timestamp_ms, 0) for k, v in sorted(payload.metrics.items())]
    params = [Param(k, str(v)) for k, v in sorted(payload.params.items())]
    mlflow.log_batch(
        run_id, metrics=metrics, params=params, tags=[RunTag(k, v) for k, v in payload.tags.items()]
    )
    step("logged")
    for name, content in payload.artifacts.items():
        mlflow.log_text(run_id, json.dumps(content, indent=2, sort_keys=True, default=str), name)
    step("artifacts")
    mlflow.set_terminated(run_id, "FINISHED")
    mlflow.set_tag(run_id, tag.COMPLETE, "true")
    kept = _converge(mlflow, exp_id, payload.identity, owner)
    log.debug("pushed result %s to MLflow run %s", payload.identity, kept)
    return kept
