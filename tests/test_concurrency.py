"""Many at once: separate OS processes sharing one MLflow server, one data root and one runs root.

* 20 simulated device runners (processes, 4 hosts sharing an outbox each, plus a second host
  delivering two of the results again) push benchmark results to one real ``mlflow server``
  (SQLite) through the production outbox; the server is SIGKILLed while pushes are in flight and
  restarted on the same port and store; ``mvlm bench flush`` sends what was kept. Every result ends
  as exactly one complete run. Two small tests pin the cross-host rules of ``tasks.lineage.push``.
* two retrains of different recipes (``tiny`` and ``tiny-v2``) run at the same time up to the data
  step: every shared dataset build is built once, byte-identical to a serial build, catalogued once.
* two processes run the same training stage identity at once: one trains, the other waits and reuses.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from export_fixtures import MlflowServer, free_port

from tasks.lineage import tags as tag
from tasks.lineage.push import Payload

REPO = Path(__file__).resolve().parents[1]
N_RUNNERS = 20
HOSTS = 4
"""Runners share an outbox per host (flow runs of one runner machine share its work dir)."""
TWINS = (0, 1)
"""Runners whose result is also delivered, byte for byte, from another host's outbox."""


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, *args], env=env, cwd=str(REPO), stdout=subprocess.PIPE, stderr=out,
            stdin=subprocess.DEVNULL, text=True,
        )  # fmt: skip


def _wait_for(check, timeout: float, what: str, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout}s")
        time.sleep(poll)


# --- 1. device runners and an MLflow outage ----------------------------------------------------------

RUNNER = """
import dataclasses, json, os, sys, time
from pathlib import Path

from tasks.ship.bench.devices import DeviceClass
from tasks.ship.bench.protocol import BenchSettings, Measurement, Phase, Speed
from tasks.lineage.bench_runs import bench_payload
from tasks.ship.bench.results import BenchResult, bench_identity
from tasks.lineage.push import Outbox, flush
import mlflow  # loaded before the go signal, as in a long-lived runner

i, go, progress, t0 = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
device = DeviceClass(name=f"pool-{i:02d}", description="simulated runner", soc=f"soc-{i:02d}")
settings = BenchSettings(threads=1 + i % 4)
identity = bench_identity("quant-many", device, settings)
lm = Phase(load_s=0.5 + i, prompt_tokens=20 + i, prompt_tps=100.0 + i, eval_tokens=400, eval_tps=10.0 + i,
           total_s=40.0 + i)
speeds = [Speed("pp512", 500.0 + i, 1.0 + i / 10, [499.0 + i, 501.0 + i]),
          Speed("tg128", 50.0 + i, 0.5, [49.5 + i, 50.5 + i])]
measurement = Measurement(lm, None, speeds, peak_rss_mb=100.0 + i, llama_cpp="b1234", n_params=1000 + i)
result = BenchResult(identity, device.name, device.soc, "python", "local", f"host-{i % 4}", "device",
                     "quant-many", "q4_0", 10_000 + i, dataclasses.asdict(settings), measurement)
payload = bench_payload(result, "f" * 32, "export-many", "mobilevlm-tiny-336")
payload = dataclasses.replace(payload, timestamp_ms=t0 + i)  # measured at t0 + i

def step(name: str) -> None:  # a slow link: the outage catches pushes half way
    (progress / f"{name}.{i}.{time.time_ns()}").touch()
    time.sleep(0.3)

outbox = Outbox()  # <runs_root>/outbox, shared by the runners of one host
outbox.put(payload)  # push_results_task: put, then flush everything pending
(progress / f"ready.{i}.{os.getpid()}").touch()
while not go.exists():
    time.sleep(0.02)
report = flush(outbox, on_step=step)
print(json.dumps({"identity": identity, "payload": dataclasses.asdict(payload), "sent": report.sent,
                  "kept": report.kept}))
"""


def _runner_env(tmp: Path, url: str, host: str, retries: int) -> dict[str, str]:
    return {
        **os.environ,
        "MVLM_RUNS_ROOT": str(tmp / host / "runs"),
        "MVLM_WORK_DIR": str(tmp / host),
        "MLFLOW_TRACKING_URI": url,
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries),  # 0: give up at once, the outbox keeps it
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    }


def _kill(server: MlflowServer) -> None:
    """SIGKILL the server's process group: no clean shutdown, requests in flight are cut."""
    assert server.process is not None
    os.killpg(server.process.pid, signal.SIGKILL)
    server.process.wait(timeout=30)
    server.process = None


def _outbox_files(tmp: Path) -> list[Path]:
    return sorted(p for p in tmp.glob("*/runs/outbox/*") if p.is_file())


@pytest.mark.slow
def test_twenty_runners_push_exactly_once_through_a_server_kill(tmp_path: Path) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    from tasks.lineage.tracking import experiment_id

    root = tmp_path / "mlflow"
    root.mkdir()
    server = MlflowServer(root, free_port())
    server.start()
    procs: list[subprocess.Popen] = []
    try:
        progress, go = tmp_path / "progress", tmp_path / "go"
        progress.mkdir()
        t0 = int(time.time() * 1000)
        jobs = [(i, f"host-{i % HOSTS}") for i in range(N_RUNNERS)] + [(i, "host-twin") for i in TWINS]
        procs += [
            _start(
                ["-c", RUNNER, str(i), str(go), str(progress), str(t0)],
                _runner_env(tmp_path, server.url, host, retries=0 if n % 2 else 3),
                tmp_path / f"runner-{n}.log",
            )
            for n, (i, host) in enumerate(jobs)
        ]
        _wait_for(lambda: len(list(progress.glob("ready.*"))) == len(jobs), 240, "runners ready")
        go.touch()  # every runner flushes at once
        _wait_for(lambda: len(list(progress.glob("created.*"))) >= 4, 120, "first pushes")
        _kill(server)  # pushes in flight: some created, some half logged
        in_flight = len(list(progress.glob("created.*"))) - len(list(progress.glob("artifacts.*")))
        time.sleep(3)
        server.start()  # same port, same store
        reports = []
        for proc, (i, host) in zip(procs, jobs, strict=True):
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0, (tmp_path / f"runner-{procs.index(proc)}.log").read_text()[-3000:]
            reports.append((i, host, json.loads(out.strip().splitlines()[-1])))
        kept_by_runners = sum(len(r["kept"]) for *_, r in reports)
        assert in_flight > 0 and kept_by_runners > 0  # the outage really cut pushes and queued results

        # what a runner does next: the next flow run, or `mvlm bench flush`
        for _ in range(3):
            hosts = sorted(
                {p.parent.parent.parent.name for p in _outbox_files(tmp_path) if p.suffix == ".json"}
            )
            if not hosts:
                break
            flushers = [
                _start(["-m", "flows.cli", "bench", "flush"], _runner_env(tmp_path, server.url, host, 4),
                       tmp_path / f"flush-{host}.log")
                for host in hosts
            ]  # fmt: skip
            procs += flushers
            for proc in flushers:
                proc.communicate(timeout=120)
                assert proc.returncode == 0
        assert _outbox_files(tmp_path) == []  # no payload, temp file or lock left

        payloads = {r["identity"]: r["payload"] for i, host, r in reports if host != "host-twin"}
        assert len(payloads) == N_RUNNERS
        mlflow = MlflowClient(tracking_uri=server.url)
        exp = experiment_id(mlflow)
        every = mlflow.search_runs([exp], run_view_type=ViewType.ALL, max_results=1000)
        assert [r.info.run_id for r in every if r.info.status == "RUNNING"] == []
        active = mlflow.search_runs([exp], max_results=1000)
        by_identity = Counter(r.data.tags.get(tag.IDENTITY) for r in active)
        assert by_identity == Counter(list(payloads)), "one active run per result, nothing else"
        for run in active:
            payload = payloads[run.data.tags[tag.IDENTITY]]
            assert run.data.tags[tag.COMPLETE] == "true" and run.info.status == "FINISHED"
            assert run.data.params == payload["params"]
            assert {k: run.data.tags[k] for k in payload["tags"]} == payload["tags"]
            assert run.data.metrics == payload["metrics"]
            for key, value in payload["metrics"].items():
                history = mlflow.get_metric_history(run.info.run_id, key)
                assert [(m.value, m.timestamp) for m in history] == [(value, payload["timestamp_ms"])], key
            assert [a.path for a in mlflow.list_artifacts(run.info.run_id)] == ["bench_result.json"]
            local = tmp_path / "artifacts" / run.info.run_id
            local.mkdir(parents=True)
            artifact = Path(mlflow.download_artifacts(run.info.run_id, "bench_result.json", str(local)))
            assert json.loads(artifact.read_text())["device"] == payload["tags"]["device"]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        if server.process is not None:
            _kill(server)


def _bench_payload(identity: str) -> Payload:
    return Payload(
        identity=identity,
        run_name=f"bench-{identity}",
        tags={"device": "pool-x"},
        params={"threads": "2"},
        metrics={"lm.eval_tps": 12.5, "pp512.mean_tps": 456.0},
        artifacts={"bench_result.json": {"identity": identity}},
    )


def _only_run(uri: str, identity: str):
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    from tasks.lineage.tracking import experiment_id

    mlflow = MlflowClient(tracking_uri=uri)
    exp = experiment_id(mlflow)
    where = f"tags.`{tag.IDENTITY}` = '{identity}'"
    every = mlflow.search_runs([exp], where, run_view_type=ViewType.ALL)
    assert [r.info.status for r in every if r.info.status == "RUNNING"] == []
    (run,) = mlflow.search_runs([exp], where)
    assert run.data.tags[tag.COMPLETE] == "true" and run.info.status == "FINISHED"
    for key, value in _bench_payload(identity).metrics.items():
        assert [m.value for m in mlflow.get_metric_history(run.info.run_id, key)] == [value]
    return run, every


def test_two_hosts_pushing_one_identity_converge_to_one_run(tmp_path: Path) -> None:
    """Host B pushes the whole result while host A is half way: both runs complete, one is kept."""
    from tasks.lineage.push import Outbox, flush

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    host_a, host_b = Outbox(tmp_path / "a" / "outbox"), Outbox(tmp_path / "b" / "outbox")
    for outbox in (host_a, host_b):
        outbox.put(_bench_payload("shared"))
    inner: dict = {}

    def meanwhile(step: str) -> None:
        if step == "created" and not inner:
            inner["b"] = flush(host_b, uri)  # B finds A's incomplete run, not its own: B creates one

    report_a = flush(host_a, uri, on_step=meanwhile)
    run, every = _only_run(uri, "shared")
    assert report_a.sent == {"shared": run.info.run_id}  # the last to look reports the kept run
    assert list(inner["b"].sent) == ["shared"]  # B's own run, the only complete copy when B looked
    assert len(every) == 2 and {r.info.lifecycle_stage for r in every} == {"active", "deleted"}
    assert host_a.pending() == host_b.pending() == []
    assert list((tmp_path / "a" / "outbox").iterdir()) == list((tmp_path / "b" / "outbox").iterdir()) == []


def test_orphans_of_a_lost_create_answer_are_adopted_then_removed(tmp_path: Path) -> None:
    """Two runs the host created without hearing back (an HTTP retry of create): one is reused, one goes."""
    from mlflow import MlflowClient

    from tasks.lineage.push import Outbox, flush
    from tasks.lineage.tracking import experiment_id

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    outbox = Outbox(tmp_path / "outbox")
    mlflow = MlflowClient(tracking_uri=uri)
    created = [
        mlflow.create_run(experiment_id(mlflow), tags={tag.IDENTITY: "lost", tag.OWNER: outbox.owner})
        for _ in range(2)
    ]
    # The one rule keeps the earliest start, then the smallest id (two creates may share a millisecond).
    orphans = [r.info.run_id for r in sorted(created, key=lambda r: (r.info.start_time, r.info.run_id))]
    outbox.put(_bench_payload("lost"))
    assert flush(outbox, uri).sent == {"lost": orphans[0]}
    run, every = _only_run(uri, "lost")
    assert run.info.run_id == orphans[0] and len(every) == 2
    assert mlflow.get_run(orphans[1]).info.status == "KILLED"


# --- 2. two retrains of different recipes, one data root -----------------------------------------------

BUILD_ROW = re.compile(r"(tiny-[\w-]+)\s*│\s*([0-9a-f]{16})\s*│\s*(built|reused)\s*│")


def _session_env(work: Path) -> dict[str, str]:
    """Environment of a subprocess using this session's Prefect API and Ray cluster, roots under ``work``."""
    import ray
    from prefect.settings import PREFECT_API_URL

    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MLFLOW_TRACKING_URI", "MVLM_DATA_ROOT", "MVLM_RUNS_ROOT")
    }
    return {
        **env,
        "MVLM_WORK_DIR": str(work),
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        "MVLM_NO_PROGRESS": "1",
        "COLUMNS": "250",
    }


def _temp_files(root: Path) -> list[Path]:
    """Leftovers of interrupted or torn writes: ``.NAME.*.tmp`` files and ``*.tmp.*`` names."""
    return sorted(p for p in root.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name)


def _shard_hashes(build: Path) -> dict[str, str]:
    from tasks.core.identity import sha256_file

    return {str(p.relative_to(build)): sha256_file(p) for p in sorted((build / "shards").rglob("*.tar"))}


def test_retrain_until_takes_the_flow_steps() -> None:
    """``mvlm retrain --until`` offers exactly the flow's steps and refuses anything else."""
    import typing

    from typer.testing import CliRunner

    from flows.cli import app
    from flows.cli_retrain import retrain as command
    from flows.retrain import STEPS, Step

    option = typing.get_args(typing.get_type_hints(command, include_extras=True)["until"])[0]
    assert typing.get_args(typing.get_args(option)[0]) == typing.get_args(Step) == STEPS
    result = CliRunner().invoke(app, ["retrain", "tiny", "--until", "deploy"])
    assert result.exit_code == 2 and "deploy" in result.output


@pytest.mark.slow
def test_two_retrains_of_different_recipes_build_shared_data_once(
    samples_root: Path, prefect_api: None, ray_local: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import Image

    from tasks.core.identity import read_json
    from tasks.data.catalog import query
    from tasks.data.specs import find_spec
    from tasks.lineage import tracking
    from tasks.quality.eval_index import build_decontaminated
    from tasks.train.recipes import get_recipe

    specs = sorted({d.spec for s in get_recipe("tiny").enabled_stages() for d in s.datasets})
    assert specs == sorted({d.spec for s in get_recipe("tiny-v2").enabled_stages() for d in s.datasets})
    work, serial_root = tmp_path / "work", tmp_path / "serial"
    for data in (work / "data", serial_root):
        data.mkdir(parents=True)
        (data / "samples").symlink_to(samples_root / "samples")
    # Cold start: no MLflow store yet. Both processes open it at once; tasks.lineage.tracking.client sets the
    # SQLite store up under a machine-wide lock and experiment creation converges.
    monkeypatch.setenv("MVLM_WORK_DIR", str(work))
    assert not (work / "mlflow.db").exists()
    env = _session_env(work)
    command = ["-m", "flows.cli", "retrain"]  # `mvlm retrain RECIPE --until data`, both at once
    procs = {
        r: _start([*command, r, "--until", "data"], env, tmp_path / f"{r}.log") for r in ("tiny", "tiny-v2")
    }
    outputs = {recipe: proc.communicate(timeout=600)[0] for recipe, proc in procs.items()}
    for recipe, proc in procs.items():
        assert proc.returncode == 0, (
            outputs[recipe][-3000:] + (tmp_path / f"{recipe}.log").read_text()[-3000:]
        )
        assert "stopped after step data (--until data)" in outputs[recipe], outputs[recipe]

    rows = {recipe: {m[0]: (m[1], m[2]) for m in BUILD_ROW.findall(out)} for recipe, out in outputs.items()}
    assert sorted(rows["tiny"]) == sorted(rows["tiny-v2"]) == specs, outputs
    logs = "".join([*outputs.values(), *((tmp_path / f"{r}.log").read_text() for r in procs)])
    data_root = work / "data"
    for spec in specs:
        (build_id, status_a), (other_id, status_b) = rows["tiny"][spec], rows["tiny-v2"][spec]
        assert build_id == other_id
        assert sorted([status_a, status_b]) == ["built", "reused"], spec  # one built, the other waited
        assert logs.count(f"building {build_id} into") == 1, spec
        build = data_root / "builds" / spec / build_id
        manifest = read_json(build / "manifest.json")
        with Image.open(build / "tokens.png") as chart:  # written by both processes' flows: not torn
            chart.load()
        units = sorted((build / "units").glob("*.json"))
        assert units and all(
            u.stat().st_mtime_ns <= (build / "manifest.json").stat().st_mtime_ns for u in units
        )
        # the same bytes as a serial build in a root of its own
        serial = build_decontaminated(find_spec(spec)[0], serial_root)
        assert not serial.reused and serial.build_id == build_id
        assert _shard_hashes(build) == _shard_hashes(serial.path)
        assert {r["path"]: r["sha256"] for r in manifest["shards"]} == {
            r["path"]: r["sha256"] for r in serial.manifest["shards"]
        }
    assert _temp_files(data_root / "builds") == []

    catalog = data_root / "catalog.duckdb"
    ids = sorted(rows["tiny"][s][0] for s in specs)
    assert query(catalog, "SELECT build_id, count(*) FROM builds GROUP BY build_id ORDER BY 1")[1] == [
        (i, 1) for i in ids
    ]
    assert query(catalog, "SELECT name, latest_build FROM datasets ORDER BY 1")[1] == [
        (s, rows["tiny"][s][0]) for s in specs
    ]
    for spec in specs:
        build_id = rows["tiny"][spec][0]
        shards = read_json(data_root / "builds" / spec / build_id / "manifest.json")["shards"]
        sql = "SELECT path, sha256 FROM shards WHERE build_id = ? ORDER BY path"
        assert query(catalog, sql, [build_id])[1] == sorted((s["path"], s["sha256"]) for s in shards)
    mlflow = tracking.client()
    exp = tracking.experiment_id(mlflow, tracking.EXPERIMENT)
    parents = mlflow.search_runs([exp], "tags.`mvlm.kind` = 'retrain'")
    assert sorted(r.data.tags["mvlm.recipe"] for r in parents) == ["tiny", "tiny-v2"]
    for run in parents:  # each retrain run lists every shared build as its input, and where it stopped
        assert run.info.status == "FINISHED" and run.data.tags["mvlm.stopped_after"] == "data"
        assert sorted(d.dataset.digest for d in run.inputs.dataset_inputs) == ids


# --- 3. two processes, one training stage identity ------------------------------------------------------

SHORT_STAGE = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
from prefect import flow
from flows.train import plan_stage_task, run_stage_task, stage_init
from tasks.train.recipes import get_recipe

SHORT = {"max_steps": 4, "checkpoint_every": 2, "micro_batch": 4, "global_batch": 8, "num_workers": 1}

@flow(name="short-stage")
def short_stage(data_root: str, runs_root: str) -> dict:
    recipe = get_recipe("tiny", **{"llm-pretrain": SHORT})
    stage = recipe.stage("llm-pretrain")
    plan = plan_stage_task(recipe, stage, stage_init(stage, None, runs_root), data_root, runs_root)
    return run_stage_task(plan)

print(json.dumps(short_stage(sys.argv[1], sys.argv[2])))
"""


@pytest.mark.slow
def test_two_processes_one_stage_identity_train_once(
    samples_root: Path, prefect_api: None, ray_local: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks.core.identity import read_json, sha256_file
    from tasks.data.build import build_dataset
    from tasks.data.specs import find_spec
    from tasks.lineage import tracking

    work = tmp_path / "work"
    data_root, runs_root = work / "data", work / "runs"
    data_root.mkdir(parents=True)
    (data_root / "samples").symlink_to(samples_root / "samples")
    build_dataset(find_spec("tiny-redpajama")[0], data_root)
    monkeypatch.setenv("MVLM_WORK_DIR", str(work))
    assert not (work / "mlflow.db").exists()  # cold start, as in the retrain test
    env = _session_env(work)
    args = ["-c", SHORT_STAGE, str(data_root), str(runs_root)]
    first = _start(args, env, tmp_path / "first.log")
    # the second starts once the first holds the stage lock (plan.json is written under it): it finds the
    # first's MLflow run, waits on the lock while the first trains, then reuses the finished stage
    _wait_for(
        lambda: any(runs_root.glob("tiny/llm-pretrain/*/plan.json")), 300, "first process training", 0.2
    )
    second = _start(args, env, tmp_path / "second.log")
    results = []
    for name, proc in (("first", first), ("second", second)):
        out, _ = proc.communicate(timeout=600)
        log = (tmp_path / f"{name}.log").read_text()
        assert proc.returncode == 0, out[-2000:] + log[-4000:]
        results.append((json.loads(out.strip().splitlines()[-1]), log))
    (trained, first_log), (reused, second_log) = results
    assert reused == trained  # the same manifest: same stage id, final checkpoint sha256, MLflow run
    assert "finished before; reusing" in second_log and "finished before; reusing" not in first_log
    assert "waiting for" in second_log  # it really waited on the lock while the first trained

    out = Path(trained["final"]).parent
    assert read_json(out / "stage.json") == trained
    assert sha256_file(out / "final" / "model.safetensors") == trained["final_sha256"]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
        4,
    ]
    assert "trainable params" in first_log and "trainable params" not in second_log  # one Ray Train run
    assert _temp_files(runs_root) == []
    mlflow = tracking.client()
    exp = tracking.experiment_id(mlflow, tracking.EXPERIMENT)
    (run,) = mlflow.search_runs([exp], f"tags.`mvlm.identity` = '{trained['stage_id']}'")
    assert run.info.run_id == trained["mlflow_run_id"] and run.info.status == "FINISHED"
    assert sorted(m.step for m in mlflow.get_metric_history(run.info.run_id, "loss")) == [1, 2, 3, 4]


_RUN_FOR = """
import json, sys, time
from tasks.lineage import tracking
from tasks.lineage import tags as tag
mlflow = tracking.client(sys.argv[1])
tracking.experiment_id(mlflow, "race")
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # both processes start together
ids = [tracking.run_for(mlflow, "race", f"step-{i}", f"step {i}")[0] for i in range(15)]
print(json.dumps(ids))
"""


def test_two_processes_opening_the_same_steps_end_with_one_run_each(tmp_path: Path) -> None:
    """tasks.lineage.tracking.run_for: a look-up-then-create race converges on one run per identity."""
    from tasks.lineage import tracking

    server = MlflowServer(tmp_path, free_port())
    server.start()
    try:
        go = str(time.time() + 8)
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _RUN_FOR, server.url, go], stdout=subprocess.PIPE, text=True
            )
            for _ in range(2)
        ]
        outs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
        assert all(p.returncode == 0 for p in procs)
        assert outs[0] == outs[1]  # both callers got the same run for every identity
        mlflow = tracking.client(server.url)
        runs = mlflow.search_runs([tracking.experiment_id(mlflow, "race")], max_results=100)
        assert Counter(r.data.tags[tag.IDENTITY] for r in runs) == {f"step-{i}": 1 for i in range(15)}
    finally:
        server.stop()
