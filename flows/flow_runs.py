"""Flow runs a killed process left RUNNING in Prefect: found by the next run and marked Crashed.

A SIGKILLed retrain cannot report its end, so Prefect would show it (and its subflows and task
runs) as running forever. Each retrain holds a per-recipe lock for its whole life and records its
flow run id in a claim file beside the lock; the next retrain of that recipe takes the lock, so the
recorded run's process is gone, and if Prefect still shows that run (or anything under it) as not
finished, it is set to Crashed with a message naming the run that found it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tasks.core.identity import atomic_write_text

log = logging.getLogger(__name__)
ACTIVE = ("RUNNING", "PENDING", "SCHEDULED", "PAUSED", "CANCELLING")
"""State types that mean "not finished" (a dead process cannot finish them)."""


def take_over(claim: Path, flow_run_id: str | None) -> list[str]:
    """With the recipe's lock held: crash what the previous claimant left active; claim for ``flow_run_id``.

    Returns the ids of flow and task runs set to Crashed. Prefect errors (a different API, a run
    that no longer exists) are logged and do not stop the retrain.
    """
    previous = None
    if claim.is_file():
        try:
            previous = json.loads(claim.read_text()).get("flow_run_id")
        except (json.JSONDecodeError, AttributeError):
            log.warning("%s: unreadable claim file; ignoring it", claim)
    crashed: list[str] = []
    if previous and previous != flow_run_id:
        try:
            crashed = crash_orphans(previous, flow_run_id)
        except Exception as err:  # the API may not know that run (another server, or deleted)
            log.warning("could not check flow run %s left by an earlier retrain: %s", previous, err)
    if flow_run_id:
        atomic_write_text(claim, json.dumps({"flow_run_id": flow_run_id}))
    if crashed:
        log.warning(
            "marked %d run(s) Crashed that a killed retrain left running (flow run %s)",
            len(crashed),
            previous,
        )
    return crashed


def crash_orphans(flow_run_id: str, found_by: str | None) -> list[str]:
    """Set ``flow_run_id``, its subflow runs and their task runs to Crashed where still active."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterParentFlowRunId,
        FlowRunFilterState,
        FlowRunFilterStateType,
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.states import Crashed

    message = f"the process running it was killed; found and resumed by flow run {found_by}"
    crashed: list[str] = []
    with get_client(sync_client=True) as client:
        frontier, flow_ids = [flow_run_id], [flow_run_id]
        while frontier:  # the tree of subflows
            children = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier))
            )
            frontier = [str(c.id) for c in children]
            flow_ids += frontier
        active_flows = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=flow_ids),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=list(ACTIVE))),
            )
        )
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=flow_ids)),
            task_run_filter=TaskRunFilter(
                state=TaskRunFilterState(type=TaskRunFilterStateType(any_=list(ACTIVE)))
            ),
        )
        for task_run in tasks:
            client.set_task_run_state(task_run.id, Crashed(message=message), force=True)
            crashed.append(str(task_run.id))
        for run in active_flows:
            client.set_flow_run_state(run.id, Crashed(message=message), force=True)
            crashed.append(str(run.id))
    return crashed


def current_flow_run_id() -> str | None:
    """The id of the flow run this code runs in, if any."""
    from prefect.runtime import flow_run

    run_id: Any = flow_run.id
    return str(run_id) if run_id else None
