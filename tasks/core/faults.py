"""Fault points: the named places where the chaos harness (``tasks.testkit.chaos``) kills a run.

``hit(name)`` returns at once unless ``MVLM_FAULTS`` names a plan folder. With one, every call
counts itself in a hit log shared by every process of the run (driver, Ray workers, data-loader
workers), and the call that is hit number ``n`` of the planned point writes ``fired.json`` and
blocks; the harness sees the file and SIGKILLs the whole process tree while this process sits
exactly at the point. So a kill lands *between* the two halves of the operation the point names,
which a timer alone would hit only by luck.

The plan folder holds ``plan.json`` (``{"point": name, "n": int}``) and the hit logs; processes
find it through the environment they inherit (Ray's local raylet and its workers inherit the
driver's). Without a plan the cost of a point is one ``os.environ`` lookup.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

ENV = "MVLM_FAULTS"
"""Environment variable naming the plan folder; unset in production."""
BLOCK_S = 300.0
"""How long a fired point waits for the harness before it exits by itself (status 137)."""

POINTS: dict[str, str] = {
    "shard-sample": "a webdataset shard is half written (after one sample, before the tar is renamed)",
    "shard-commit": "a shard was renamed into place but its sidecar record is not written yet",
    "dedup-bucket": "a dedup bucket's drops and edges are written but its completion record is not",
    "unit-commit": "a build unit's shards are done but its completion record is not written yet",
    "catalog-write": "a finished build is about to be recorded in the DuckDB catalog",
    "train-step": "inside an optimizer step: the micro-batch's backward and step are done",
    "metrics-push": "a stage's step metrics reached MLflow but the checkpoint after them is not saved",
    "checkpoint-file": "DeepSpeed wrote one file of a checkpoint; the others and ``latest`` are pending",
    "stage-final": "a stage's final weights are saved but its manifest is not written",
    "mlflow-push": "one request of an outbox push (run, params, metrics, artifacts, complete tag) is done",
    "register": "a model version is about to be registered or tagged",
}
"""Every point, with the moment it stands for (the harness picks among these)."""


def hit(name: str) -> None:
    """Count a pass through fault point ``name``; block here if it is the planned kill."""
    folder = os.environ.get(ENV)
    if folder:
        _hit(Path(folder), name)


def _hit(folder: Path, name: str) -> None:

    if name not in POINTS:
        raise ValueError(f"unknown fault point {name!r}; add it to tasks.core.faults.POINTS")
    try:
        plan = json.loads((folder / "plan.json").read_text())
    except FileNotFoundError:
        return
    with open(folder / f"hits-{name}.log", "a+b") as log:
        fcntl.flock(log, fcntl.LOCK_EX)  # a count shared by every process of the run
        log.seek(0, os.SEEK_END)
        count = log.tell() + 1
        log.write(b"x")
        log.flush()
        fcntl.flock(log, fcntl.LOCK_UN)
    if plan.get("point") != name or count != int(plan.get("n", 0)):
        return
    fired = {"point": name, "n": count, "pid": os.getpid(), "time": time.time()}
    tmp = folder / f".fired.{os.getpid()}"
    tmp.write_text(json.dumps(fired))
    os.replace(tmp, folder / "fired.json")
    deadline = time.monotonic() + BLOCK_S
    while time.monotonic() < deadline:  # the harness kills us here
        time.sleep(0.05)
    os._exit(137)
