"""A real two-node Ray cluster on this machine: a shard build and a 2-worker training stage across nodes.

``tests/two_node_ray.py`` runs inside ``unshare -n`` (a network namespace whose only interface is
``lo``): it starts a Ray head and a second Ray node with ``ray start`` (one CPU each), a separate
driver process reaches them through ``RAY_ADDRESS=127.0.0.1:<port>`` and runs the pipeline's own
code (``build_dataset``, ``plan_stage`` + ``run_stage``), then both nodes are stopped by process
group. The pytest process never connects to that cluster (it may hold its own local Ray).

Both Ray nodes report IP 127.0.0.1, so Ray Train numbers the two workers as local ranks 0 and 1 of
one "node"; which Ray node each worker actor ran on is read from the GCS actor table.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import two_node_ray

from tasks.data.build import verify_build
from tasks.data.specs import load_spec

HELPER = Path(two_node_ray.__file__)


def _namespaces_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0


def _processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def _run_cluster(out: Path, samples_root: Path, lose_node: bool = False) -> dict:
    """Run the helper's ``cluster`` (in a fresh network namespace); its result.json."""
    out.mkdir()
    # Ray's Unix sockets live under --temp-dir; pytest's tmp_path is too long for their 107-byte limit.
    ray_temp = Path(tempfile.mkdtemp(prefix="mvlm-2n-"))
    cmd = ["unshare", "-n", sys.executable, str(HELPER), "cluster", "--out", str(out),
           "--samples", str(samples_root), "--ray-temp", str(ray_temp), "--timeout", "270"]  # fmt: skip
    if lose_node:
        cmd.append("--lose-node")
    helper = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = helper.communicate(timeout=330)
    except subprocess.TimeoutExpired:
        os.killpg(helper.pid, signal.SIGKILL)  # the helper and its driver process
        stdout, stderr = helper.communicate()
    finally:
        pgids = (out / "pgids").read_text().split() if (out / "pgids").exists() else []
        two_node_ray.stop_groups([int(p) for p in pgids])  # no-op unless the helper itself was killed
        leftovers = _processes_mentioning(str(ray_temp))
        shutil.rmtree(ray_temp, ignore_errors=True)
    logs = "\n".join(f"--- {n}\n{_tail(out / n)}" for n in ("head.log", "worker.log", "driver.log"))
    assert helper.returncode == 0, f"{stdout}\n{stderr}\n{logs}"
    assert leftovers == [], f"Ray processes left running: {leftovers}"
    return json.loads((out / "result.json").read_text())


needs_namespaces = pytest.mark.skipif(
    not _namespaces_available(), reason="needs `unshare -n` (network namespaces)"
)


@pytest.fixture(scope="module")
def uninterrupted(samples_root: Path, tmp_path_factory) -> dict:
    """The cluster run with both nodes up throughout."""
    return _run_cluster(tmp_path_factory.mktemp("two-node") / "run", samples_root)


def _losses(stage_out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (stage_out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows]


@pytest.mark.slow
@needs_namespaces
def test_two_node_cluster_builds_shards_and_trains_across_nodes(uninterrupted: dict) -> None:
    result = uninterrupted

    # A cluster of two Ray nodes, reached and advertised on loopback only.
    nodes = result["nodes"]
    assert len(nodes) == 2 and len({n["id"] for n in nodes}) == 2
    assert all(n["ip"] == "127.0.0.1" and n["cpus"] == 1 for n in nodes)
    assert result["ray_address"] == result["gcs_address"] and result["gcs_address"].startswith("127.0.0.1:")

    # (a) The shard build on the cluster is complete: its manifest verifies every shard's sha256.
    build = result["build"]
    assert not build["reused"]
    manifest = verify_build(Path(build["path"]), deep=True)
    assert manifest is not None and manifest["kind"] == "text"
    assert {r["split"] for r in manifest["shards"]} == {"train", "heldout"}
    totals = manifest["stats"]["totals"]
    assert totals["sequences"] == sum(r["samples"] for r in manifest["shards"]) > 0
    seq_len = load_spec(two_node_ray.SPECS / "tiny-redpajama.yaml").seq_len
    assert totals["tokens"] == totals["sequences"] * seq_len  # packed, no padding

    # (b) The 2-worker stage finished, with every step logged once and a verified final checkpoint.
    stage = result["stage"]
    assert (
        stage["steps"] == two_node_ray.TRAIN["max_steps"]
        and stage["builds"][0]["build_id"] == build["build_id"]
    )
    stage_out = Path(result["stage_out"])
    steps = [json.loads(line)["step"] for line in (stage_out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, two_node_ray.TRAIN["max_steps"] + 1))
    from tasks.train.stage import finished_stage

    assert finished_stage(stage_out)["final_sha256"] == stage["final_sha256"]

    # The two Ray Train workers ran on the two different Ray nodes.
    workers = result["train_workers"]
    assert len(workers) == 2 and all(w["same_job"] for w in workers)
    assert {w["node_id"] for w in workers} == {n["id"] for n in nodes}


@pytest.mark.slow
@needs_namespaces
def test_losing_a_node_mid_build_and_mid_stage_gives_the_same_shards_and_losses(
    uninterrupted: dict, samples_root: Path, tmp_path: Path
) -> None:
    """The second node's whole process group is SIGKILLed (raylet, object store, workers) while a build
    unit sits between its shards and its record, and again inside step 3 of the 2-worker stage (after
    the step-2 checkpoint). The build finishes on the head alone with the shards of the uninterrupted
    run; Ray Train (``max_failures``) restarts both workers once a new second node joins, they resume
    from the step-2 checkpoint, and every step's loss equals the uninterrupted run's within 1e-5."""
    out = tmp_path / "lose-node"
    result = _run_cluster(out, samples_root, lose_node=True)
    lost = json.loads((out / "losses.json").read_text())
    assert len(lost) == len(two_node_ray.KILLS)  # both fault points were reached and the node lost

    build, reference = result["build"], uninterrupted["build"]
    assert build["build_id"] == reference["build_id"] and not build["reused"]
    manifest = verify_build(Path(build["path"]), deep=True)
    expected = verify_build(Path(reference["path"]), deep=True)
    assert manifest is not None and expected is not None
    assert [(r["path"], r["sha256"]) for r in manifest["shards"]] == [
        (r["path"], r["sha256"]) for r in expected["shards"]
    ]
    assert manifest["stats"]["totals"] == expected["stats"]["totals"]

    driver_log = (out / "driver.log").read_text(errors="replace")
    resumed = re.search(r"resumed from \S*checkpoints/step-2/\S* at step 2", driver_log)
    assert resumed, _tail(out / "driver.log")
    # Workers ran on the node that was lost in the stage and on the one that replaced it.
    initial, before_stage = {n["id"] for n in result["nodes"]}, set(result["nodes_before_stage"])
    stage_node = (before_stage - initial).pop()  # joined after the build's loss
    worker_nodes = {w["node_id"] for w in result["train_workers"]}
    assert stage_node in worker_nodes and len(worker_nodes - initial - {stage_node}) == 1, worker_nodes
    got, want = _losses(Path(result["stage_out"])), _losses(Path(uninterrupted["stage_out"]))
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, two_node_ray.TRAIN["max_steps"] + 1))
    assert max(abs(a - b) for (_, a), (_, b) in zip(got, want, strict=True)) <= 1e-5, (got, want)
