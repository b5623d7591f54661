"""prefect.yaml for real: a Prefect server, ``prefect deploy --all``, a worker running a scheduled run.

* a real ``prefect server start`` subprocess on 127.0.0.1 (SQLite under a temporary PREFECT_HOME);
* the work pools created with ``prefect work-pool create NAME --type process`` and every deployment
  of ``prefect.yaml`` deployed with ``prefect --no-prompt deploy --all`` from the repository root,
  twice (a redeploy updates, it does not duplicate); each one read back through the API client
  (entrypoint, pool, parameters, pull step, schedule, concurrency limit);
* a ``build-data`` flow run created in the SCHEDULED state a few seconds ahead, picked up by a real
  ``prefect worker start --pool training --type process`` subprocess started outside the repository
  (the deployment's pull step moves the flow run into the checkout), which builds ``tiny-sharegpt``
  into the worker's ``MVLM_DATA_ROOT``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")
WORK_POOLS = ("training", "host-cpu", "snapdragon-888", "jetson-orin")
EXPECTED = {
    "retrain/retrain-tiny": "training",
    "retrain/retrain-mobilevlm-1.7b": "training",
    "build-data/build-data": "training",
    "device-benchmark/host-cpu": "host-cpu",
    "device-benchmark/snapdragon-888": "snapdragon-888",
    "device-benchmark/jetson-orin": "jetson-orin",
}
FLOW_NAMES = {
    "flows/retrain.py:retrain": "retrain",
    "flows/data.py:build_data": "build-data",
    "flows/device_benchmark.py:device_benchmark": "device-benchmark",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _base_env(tmp_path: Path, api_url: str) -> dict[str, str]:
    """This environment without Prefect/Ray/MLflow settings, pointed at the test server and tmp_path."""
    drop = ("PREFECT_", "RAY_", "MLFLOW_", "MVLM_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    return env | {
        "PREFECT_HOME": str(tmp_path / "prefect-client"),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MVLM_NO_PROGRESS": "1",
    }


def _start(argv: list[str], env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(
            argv, env=env, cwd=str(cwd), stdout=out, stderr=out, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _wait_health(url: str, proc: subprocess.Popen, log: Path, timeout: float = 150) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, (
            f"prefect server exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        )
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout}s:\n{log.read_text()[-3000:]}")


def _cli(args: list[str], env: dict[str, str], timeout: float = 180) -> str:
    done = subprocess.run(
        [PREFECT, *args], env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 0, (
        f"prefect {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done.stdout


def _project_deployments() -> dict[str, dict]:
    """``flow/deployment`` -> its entry in prefect.yaml."""
    project = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    return {f"{FLOW_NAMES[d['entrypoint']]}/{d['name']}": d for d in project["deployments"]}


def _stop_flow_run_group(api_url: str, flow_run_id) -> None:
    """End what is left of the flow run's process group: the worker starts each flow run in a session of
    its own, and Ray's agents from the flow run's local Ray outlive it by up to a minute."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        pid = (client.read_flow_run(flow_run_id).infrastructure_pid or "").rpartition(":")[2]
    if not pid.isdigit():
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        deadline = time.monotonic() + 10
        try:
            os.killpg(int(pid), sig)
            while time.monotonic() < deadline:
                os.killpg(int(pid), 0)
                time.sleep(0.2)
        except ProcessLookupError:
            return


@pytest.mark.slow
def _bench_statuses(api_url: str, jetson_id: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """A retrain's device step: pending only when no deployment or no live runner; failed when a runner
    ran it and it failed (here the run is forced to Failed by the API, as a crashed runner reports)."""
    import threading

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Failed

    from flows.device_benchmark import bench_on_pool

    monkeypatch.setenv("PREFECT_API_URL", api_url)
    with temporary_settings({PREFECT_API_URL: api_url}):
        missing = bench_on_pool("quant-run", "no-such-pool", "m@1", timeout_s=2)
        assert (
            missing["status"] == "pending"
            and "no deployment device-benchmark/no-such-pool" in missing["reason"]
        )
        idle = bench_on_pool("quant-run", "snapdragon-888", "m@1", timeout_s=2)
        assert idle["status"] == "pending" and "no live runner" in idle["reason"], idle

        forced: list[object] = []

        def fail_it() -> None:  # settings are per context: this thread names the server itself
            with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
                for _ in range(200):
                    runs = [r for r in client.read_flow_runs() if r.deployment_id == jetson_id]
                    if runs:
                        client.set_flow_run_state(runs[0].id, Failed(message="runner crashed"), force=True)
                        forced.append(runs[0].id)
                        return
                    time.sleep(0.2)

        thread = threading.Thread(target=fail_it)
        thread.start()
        failed = bench_on_pool("quant-run", "jetson-orin", "m@1", timeout_s=60)
        thread.join()
        assert forced, "the helper thread never saw the device-benchmark run on the server"
        assert failed["status"] == "failed" and "ended FAILED" in failed["reason"], failed


def test_deploy_all_and_a_worker_runs_a_scheduled_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Scheduled

    from tasks.ship.bench import load_pools
    from tasks.testkit.sample_tree import make_samples

    started = time.monotonic()
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = _base_env(tmp_path, api_url)
    server_env = env | {"PREFECT_HOME": str(tmp_path / "prefect-server")}
    server_log, worker_log = tmp_path / "server.log", tmp_path / "worker.log"
    server = worker = flow_run = None
    try:
        server = _start(
            [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
            server_env, server_log, tmp_path,
        )  # fmt: skip
        _wait_health(f"{api_url}/health", server, server_log)
        for pool in WORK_POOLS:
            _cli(["work-pool", "create", pool, "--type", "process"], env)
        out = _cli(["--no-prompt", "deploy", "--all"], env)
        assert out.count("successfully created") == len(EXPECTED), out[-3000:]

        project = _project_deployments()
        assert set(project) == set(EXPECTED)
        pools_file = load_pools()
        assert {n for n in EXPECTED if n.startswith("device-benchmark/")} == {
            f"device-benchmark/{p}" for p in pools_file
        }, "one device-benchmark deployment per pool of infra/runners/pools.yaml"

        with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
            deployed = {name: client.read_deployment_by_name(name) for name in EXPECTED}
            for name, deployment in deployed.items():
                spec = project[name]
                assert deployment.work_pool_name == EXPECTED[name] == spec["work_pool"]["name"], name
                assert deployment.entrypoint == spec["entrypoint"], name
                assert deployment.parameters == spec["parameters"], name
                schema = deployment.parameter_openapi_schema
                assert set(deployment.parameters) <= set(schema["properties"]), name
                assert deployment.pull_steps == [
                    {"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}
                ], name
                assert deployment.enforce_parameter_schema and not deployment.paused, name
                if name.startswith("device-benchmark/"):
                    assert (
                        deployment.parameters == {"pool": deployment.name} and deployment.name in pools_file
                    )

            assert deployed["retrain/retrain-tiny"].parameters == {"recipe_name": "tiny"}
            big = deployed["retrain/retrain-mobilevlm-1.7b"]
            assert big.parameters["recipe_name"] == "mobilevlm-1.7b"
            assert big.parameters["pools"] == ["snapdragon-888", "jetson-orin"]
            for name in ("retrain/retrain-tiny", "retrain/retrain-mobilevlm-1.7b"):
                limit = deployed[name].global_concurrency_limit
                assert limit is not None and limit.limit == 1, name
            (schedule,) = big.schedules
            assert isinstance(schedule.schedule, CronSchedule) and schedule.active
            assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 3 * * 0", "UTC")
            assert all(not d.schedules for n, d in deployed.items() if n != "retrain/retrain-mobilevlm-1.7b")
            # the active cron schedule already put runs on the calendar: Sundays, 03:00 UTC
            # (the server's scheduler service does it within seconds of the deploy)
            deadline = time.monotonic() + 60
            while not (upcoming := [r for r in client.read_flow_runs() if r.deployment_id == big.id]):
                assert time.monotonic() < deadline, "the cron schedule made no scheduled runs"
                time.sleep(1)
            assert upcoming and all(r.state_type == StateType.SCHEDULED for r in upcoming)
            for run in upcoming:
                when = run.expected_start_time.astimezone(UTC)
                assert (when.weekday(), when.hour, when.minute) == (6, 3, 0), when
                assert when > datetime.now(UTC)

            # a run of build-data must name its spec: the server rejects one without `name`
            build = deployed["build-data/build-data"]
            with pytest.raises(PrefectHTTPStatusError, match="name"):
                client.create_flow_run_from_deployment(build.id, parameters={})

        # deploying again updates the same deployments and keeps one schedule
        _cli(["--no-prompt", "deploy", "--all"], env)
        with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
            again = {name: client.read_deployment_by_name(name) for name in EXPECTED}
            assert {n: d.id for n, d in again.items()} == {n: d.id for n, d in deployed.items()}
            assert len(again["retrain/retrain-mobilevlm-1.7b"].schedules) == 1
            assert len(client.read_deployments()) == len(EXPECTED)
            # keep the weekly retrain off this test's worker, even on a Sunday at 03:00 UTC
            client.pause_deployment(big.id)
            for run in client.read_flow_runs():
                if run.deployment_id == big.id:
                    client.delete_flow_run(run.id)

        _bench_statuses(api_url, deployed["device-benchmark/jetson-orin"].id, monkeypatch)

        # a scheduled run of build-data, picked up by a real process worker when it is due
        data_root = tmp_path / "data"
        make_samples(data_root / "samples")
        with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
            due = datetime.now(UTC) + timedelta(seconds=20)
            flow_run = client.create_flow_run_from_deployment(
                build.id, parameters={"name": "tiny-sharegpt"}, state=Scheduled(scheduled_time=due)
            )
            assert flow_run.state_type == StateType.SCHEDULED
        worker_env = env | {
            "PREFECT_HOME": str(tmp_path / "prefect-worker"),
            "PREFECT_WORKER_QUERY_SECONDS": "2",
            "MVLM_WORK_DIR": str(tmp_path / "work"),
            "MVLM_DATA_ROOT": str(data_root),
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}",
        }
        runner_dir = tmp_path / "runner"  # not the checkout: the pull step must move the run there
        runner_dir.mkdir()
        worker = _start(
            [PREFECT, "worker", "start", "--pool", "training", "--type", "process", "--name", "test"],
            worker_env, worker_log, runner_dir,
        )  # fmt: skip
        with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
            while not client.read_workers_for_work_pool("training"):  # polling before the run is due
                assert worker.poll() is None, f"worker exited:\n{worker_log.read_text()[-3000:]}"
                time.sleep(0.5)
            assert datetime.now(UTC) < due, "the worker took too long to start to show it waits"
            deadline = time.monotonic() + 150
            while time.monotonic() < deadline:
                flow_run = client.read_flow_run(flow_run.id)
                if flow_run.state is not None and flow_run.state.is_final():
                    break
                assert worker.poll() is None, f"worker exited:\n{worker_log.read_text()[-3000:]}"
                time.sleep(1)
            logs = worker_log.read_text()[-4000:]
            assert flow_run.state is not None and flow_run.state.is_completed(), f"{flow_run.state}\n{logs}"
            assert flow_run.name == "build-data-tiny-sharegpt" and flow_run.work_pool_name == "training"
            # not before it was due (the server rounds the wait to whole seconds)
            assert flow_run.start_time is not None, flow_run
            assert flow_run.start_time >= due - timedelta(seconds=1), (flow_run.start_time, due)
    finally:
        _stop(worker)
        if flow_run is not None and server is not None and server.poll() is None:
            _stop_flow_run_group(api_url, flow_run.id)
        _stop(server)

    from tasks.data.build import make_context, verify_build
    from tasks.data.specs import find_spec, load_spec
    from tasks.quality.eval_index import index_for

    (build_dir,) = (p for p in (data_root / "builds" / "tiny-sharegpt").iterdir() if p.is_dir())
    spec_path = find_spec("tiny-sharegpt")[0]
    index = index_for(load_spec(spec_path), data_root)  # the spec decontaminates: the index is in its id
    assert build_dir.name == make_context(spec_path, str(data_root), index).build_id
    manifest = verify_build(build_dir)  # manifest.json, every shard's sha256 checked
    assert manifest is not None and manifest["name"] == "tiny-sharegpt" and manifest["shards"]
    assert (data_root / "catalog.duckdb").is_file()
    print(f"deploy + scheduled build through a process worker took {time.monotonic() - started:.1f}s")
