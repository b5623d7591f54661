"""A killed retrain's flow run (and what ran under it) is marked Crashed by the next retrain."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("prefect_api")


def test_the_next_claimant_crashes_what_a_killed_run_left_running(tmp_path: Path) -> None:
    from prefect import flow, get_client
    from prefect.states import Running

    from flows.flow_runs import take_over

    @flow(name="killed-retrain")
    def killed() -> None:
        pass

    @flow(name="killed-subflow")
    def sub() -> None:
        pass

    claim = tmp_path / ".retrain-x.flow_run.json"
    with get_client(sync_client=True) as client:
        dead = client.create_flow_run(killed, state=Running())
        task_run = client.create_task_run(_task(), flow_run_id=dead.id, dynamic_key="0", state=Running())
        child = client.create_flow_run(sub, parent_task_run_id=task_run.id, state=Running())
        finished = client.create_flow_run(killed)
    assert take_over(claim, str(dead.id)) == []  # first claimant: nothing before it
    crashed = take_over(claim, "next-run-id")
    assert set(crashed) == {str(dead.id), str(task_run.id), str(child.id)}
    with get_client(sync_client=True) as client:
        for run_id in (dead.id, child.id):
            state = client.read_flow_run(run_id).state
            assert state.type.value == "CRASHED" and "next-run-id" in state.message
        assert client.read_task_run(task_run.id).state.type.value == "CRASHED"
        assert client.read_flow_run(finished.id).state.type.value != "CRASHED"
    assert take_over(claim, "next-run-id") == []  # its own claim: nothing to do


def _task():
    from prefect import task

    @task(name="a-step")
    def step() -> None:
        pass

    return step
