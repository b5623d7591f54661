"""Two Ray nodes on this machine, loopback only, and a driver that builds shards and trains on them.

Used by ``tests/test_two_node_ray.py``; runnable by hand as well::

    unshare -n python tests/two_node_ray.py cluster --out OUT --samples DATA_ROOT --ray-temp /tmp/r2n

``cluster`` must run in a fresh network namespace (``unshare -n``): it brings ``lo`` up, so the
namespace has the loopback interface and nothing else, and every socket Ray opens (its gRPC servers
bind the wildcard address) is reachable through 127.0.0.1 only. It starts a head node and a second
node with ``ray start --block`` (one CPU each, a private ``--temp-dir``, a per-run auth token), runs
the ``drive`` step as a separate driver process with ``RAY_ADDRESS=127.0.0.1:<port>``, then stops
both nodes by signalling the process groups it started (``ray stop`` would stop every Ray on the
machine). ``OUT/pgids`` lists those groups so a caller can clean up if this process is killed.

``drive`` connects through ``tasks.core.parallel.ensure_ray`` (``RAY_ADDRESS``), builds
``tiny-redpajama`` with ``tasks.data.build.build_dataset`` (Ray tasks), trains a 2-worker tiny
``llm-pretrain`` stage with ``plan_stage`` + ``run_stage`` (Ray Train + DeepSpeed, gloo), and writes
``OUT/result.json``: the nodes, the build, the stage manifest and the node of every Ray Train worker.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "data_specs"
OBJECT_STORE_BYTES = 150 * 1024 * 1024
TRAIN = {"max_steps": 8, "checkpoint_every": 2, "micro_batch": 4, "global_batch": 8, "num_workers": 2}
LOSE_NODE_FAILURES = 2
"""``max_failures`` of the stage in the node-loss run (Ray Train restarts the workers from the checkpoint)."""
KILLS = ({"point": "unit-commit", "n": 2}, {"point": "train-step", "n": 5})
"""Where the node-loss run loses the second node: the build's second unit is written but not recorded;
step 3 of the stage (two workers: hits 5 and 6), after the checkpoint of step 2."""


# --- cluster: runs inside `unshare -n` ------------------------------------------------------------


def bring_loopback_up() -> None:
    """``ip link set lo up`` without iproute2 (SIOCGIFFLAGS / SIOCSIFFLAGS)."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        req = struct.pack("16sh14x", b"lo", 0)
        flags = struct.unpack("16sh14x", fcntl.ioctl(sock, siocgifflags, req))[1]
        fcntl.ioctl(sock, siocsifflags, struct.pack("16sh14x", b"lo", flags | iff_up))


def interfaces() -> list[str]:
    """Network interfaces of this namespace."""
    lines = Path("/proc/net/dev").read_text().splitlines()[2:]
    return sorted(line.split(":")[0].strip() for line in lines)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"Ray head exited with {proc.returncode} before listening on {port}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"Ray head did not listen on 127.0.0.1:{port} within {timeout:.0f}s")


def group_members(pgid: int) -> list[int]:
    """Pids of the live processes in process group ``pgid``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def stop_groups(pgids: list[int], grace: float = 20.0) -> None:
    """SIGTERM each process group (a ``ray start --block`` leader shuts its node down), then SIGKILL."""
    for pgid in pgids:
        if group_members(pgid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(group_members(p) for p in pgids):
        time.sleep(0.2)
    for pgid in pgids:
        if group_members(pgid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)


def cluster(out: Path, samples: Path, ray_temp: Path, timeout: float, lose_node: bool = False) -> int:
    bring_loopback_up()
    ifaces = interfaces()
    if ifaces != ["lo"]:
        raise RuntimeError(f"expected a private network namespace with only lo, found {ifaces}")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),  # this cluster's own token; ~/.ray is not used
        RAY_USAGE_STATS_ENABLED="0",
        GLOO_SOCKET_IFNAME="lo",
        MVLM_NO_PROGRESS="1",
    )
    if lose_node:  # every process of the cluster counts the fault points (tasks.core.faults)
        (out / "faults").mkdir()
        env["MVLM_FAULTS"] = str(out / "faults")
    ray_bin = str(Path(sys.executable).parent / "ray")
    common = [
        "--block",
        "--node-ip-address=127.0.0.1",
        "--num-cpus=1",
        "--num-gpus=0",
        f"--temp-dir={ray_temp}",
        f"--object-store-memory={OBJECT_STORE_BYTES}",
        "--disable-usage-stats",
    ]
    head_cmd = [ray_bin, "start", "--head", f"--port={port}", "--include-dashboard=false", *common]
    worker_cmd = [ray_bin, "start", f"--address=127.0.0.1:{port}", *common]
    procs: list[subprocess.Popen] = []

    def start(cmd: list[str], name: str) -> subprocess.Popen:
        log = (out / f"{name}.log").open("w")
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        (out / "pgids").write_text(" ".join(str(p.pid) for p in procs))
        return proc

    started = time.monotonic()
    try:
        head = start(head_cmd, "head")
        wait_for_port(port, head, 60)
        start(worker_cmd, "worker")
        drive_cmd = [sys.executable, __file__, "drive", "--out", str(out), "--samples", str(samples)]
        if lose_node:
            drive_cmd.append("--lose-node")
        driver = subprocess.Popen(
            drive_cmd,
            env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"},
            cwd=ROOT,
            stdout=(out / "driver.log").open("w"),
            stderr=subprocess.STDOUT,
        )
        try:
            if lose_node:
                again = lambda: start(worker_cmd, "worker-again")  # noqa: E731
                losses = [lose_worker_node(out, procs, driver, again, kill) for kill in KILLS]
                (out / "losses.json").write_text(json.dumps(losses, indent=2))
            driver.wait(timeout=max(timeout - (time.monotonic() - started), 1))
        finally:
            if driver.poll() is None:  # timed out, or losing the node went wrong
                driver.kill()
                driver.wait()
        for proc in procs:
            if proc.poll() is not None and not getattr(proc, "lost", False):
                raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode} while the driver ran")
        return driver.returncode
    finally:
        stop_groups([p.pid for p in reversed(procs)])
        for proc in procs:
            proc.wait(timeout=5)


def lose_worker_node(out: Path, procs: list, driver: subprocess.Popen, restart, kill: dict) -> dict:
    """Arm fault point ``kill``; when a process sits at it, SIGKILL the second node's whole process
    group (raylet, object store, workers: the node is lost, not stopped) and the process at the point
    if it ran on the head; start a new second node once the build is done on the head alone, or 3 s
    after the loss in the stage (Ray Train waits for room for both workers). Returns what was lost
    when."""
    folder = out / "faults"
    (folder / "fired.json").unlink(missing_ok=True)
    (folder / ".plan.json").write_text(json.dumps(kill))
    os.replace(folder / ".plan.json", folder / "plan.json")
    deadline = time.monotonic() + 240
    while not (folder / "fired.json").exists():
        if driver.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"fault point {kill} was never reached (driver exit {driver.returncode})")
        time.sleep(0.05)
    fired = json.loads((folder / "fired.json").read_text())
    node = next(p for p in procs if not getattr(p, "lost", False) and p is not procs[0])
    on_node = fired["pid"] in group_members(node.pid)
    os.killpg(node.pid, signal.SIGKILL)
    node.lost = True
    node.wait(timeout=10)
    if not on_node:  # it ran on the head: that one task or worker dies too (Ray retries it)
        with contextlib.suppress(ProcessLookupError):
            os.kill(fired["pid"], signal.SIGKILL)
    (folder / "plan.json").unlink()
    lost = {**kill, "fired_on_lost_node": on_node, "time": time.time()}
    if kill["point"] == "unit-commit":  # the build finishes on the head alone
        manifests = out / "data" / "builds" / "tiny-redpajama"
        while not any(manifests.glob("*/manifest.json")):
            if driver.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the build did not finish after the node was lost ({driver.returncode})")
            time.sleep(0.2)
        lost["build_done"] = time.time()
    else:
        time.sleep(3)
    restart()  # a new second node (for the stage: Ray Train waits for room for both workers)
    lost["node_back"] = time.time()
    return lost


# --- drive: the driver process (RAY_ADDRESS set) --------------------------------------------------


def drive(out: Path, samples: Path, lose_node: bool = False) -> None:
    sys.path.insert(0, str(ROOT))
    import ray
    from ray._private import state

    from tasks.core.parallel import ensure_ray
    from tasks.data.build import build_dataset
    from tasks.train.recipes import get_recipe
    from tasks.train.stage import plan_stage, run_stage

    started = time.monotonic()
    ensure_ray()  # connects to RAY_ADDRESS, as every pipeline step does
    alive = _wait_nodes(2)
    result: dict = {
        "ray_address": os.environ["RAY_ADDRESS"],
        "gcs_address": ray.get_runtime_context().gcs_address,
        "nodes": [
            {"id": n["NodeID"], "ip": n["NodeManagerAddress"], "cpus": n["Resources"].get("CPU", 0)}
            for n in alive
        ],
        "nodes_ready_seconds": time.monotonic() - started,
    }

    data_root, runs_root = out / "data", out / "runs"
    data_root.mkdir(parents=True)
    (data_root / "samples").symlink_to(samples / "samples")
    t0 = time.monotonic()
    build = build_dataset(SPECS / "tiny-redpajama.yaml", data_root)
    result["build"] = {"path": str(build.path), "build_id": build.build_id, "reused": build.reused,
                       "seconds": time.monotonic() - t0}  # fmt: skip

    if lose_node:  # the build was done on the head alone; a new second node joins for the stage
        first = {n["id"] for n in result["nodes"]}
        _wait_nodes(2, fresh=first)
        result["nodes_before_stage"] = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    train = {**TRAIN, "max_failures": LOSE_NODE_FAILURES} if lose_node else TRAIN
    recipe = get_recipe("tiny", **{"llm-pretrain": train})
    stage = recipe.stage("llm-pretrain")
    t0 = time.monotonic()
    plan, _ = plan_stage(recipe, stage, {"kind": "scratch", "path": ""}, data_root, runs_root)
    result["stage"] = run_stage(plan)
    result["stage_seconds"] = time.monotonic() - t0
    result["stage_out"] = plan.out_dir

    job = ray.get_runtime_context().get_job_id()
    workers = [a for a in state.actors().values() if a["ActorClassName"] == "RayTrainWorker"]
    result["train_workers"] = [
        {"node_id": a["Address"]["NodeID"], "ip": a["Address"]["IPAddress"], "pid": a["Pid"],
         "state": a["State"], "same_job": a["JobID"] == job}
        for a in workers
    ]  # fmt: skip
    (out / "result.json").write_text(json.dumps(result, indent=2, default=str))


def _wait_nodes(count: int, timeout: float = 60, fresh: set[str] | None = None) -> list[dict]:
    """The live Ray nodes, once there are ``count`` of them (with one whose id is not in ``fresh``: a
    lost node can still count as alive until the GCS has missed enough of its heartbeats)."""
    import ray

    def ready(alive: list[dict]) -> bool:
        return len(alive) >= count and (fresh is None or any(n["NodeID"] not in fresh for n in alive))

    deadline = time.monotonic() + timeout
    while not ready(alive := [n for n in ray.nodes() if n["Alive"]]):
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(alive)} Ray node(s) alive within {timeout:.0f}s")
        time.sleep(0.5)
    return alive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["cluster", "drive"])
    parser.add_argument("--out", type=Path, required=True, help="folder for logs, data, runs, result.json")
    parser.add_argument("--samples", type=Path, required=True, help="a data root holding samples/")
    parser.add_argument("--ray-temp", type=Path, help="Ray --temp-dir (short: socket paths live there)")
    parser.add_argument("--timeout", type=float, default=270.0, help="driver seconds, start-up included")
    parser.add_argument("--lose-node", action="store_true", help="lose node 2 mid-build, mid-stage")
    args = parser.parse_args()
    if args.mode == "drive":
        drive(args.out, args.samples, args.lose_node)
        return
    if args.ray_temp is None:
        parser.error("cluster needs --ray-temp")
    sys.exit(cluster(args.out, args.samples, args.ray_temp, args.timeout, args.lose_node))


if __name__ == "__main__":
    main()
