"""Chaos harness: run a command, SIGKILL its whole process tree at K seeded moments, restart it.

Each kill is either *targeted* (at hit ``n`` of a fault point from ``tasks.core.faults``: the process
that reaches it blocks there and the harness kills the tree while it waits, so the kill lands
exactly between the two halves of that operation) or *timed* (after a seeded delay: whatever the
run happens to be doing). After every kill the command is started again, as a scheduler would
retry it; the run ends when an attempt exits 0 after all planned kills were tried.

The tree is every process whose environment carries this harness's fault folder, found through
``/proc``: that includes Ray's raylet, GCS and workers, the Prefect ephemeral server and data
loader workers, however they were started. Linux only (``/proc``).

    python -m tasks.testkit.chaos --kills 12 --seed 7 --out chaos/ -- mvlm retrain tiny
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tasks.core.faults import ENV, POINTS

log = logging.getLogger(__name__)

# The plan, in pipeline order: (point, highest n drawn), or (None, 0) for a timed kill. A targeted
# kill that the run does not reach means the run finished, so every cap is small enough that the
# point is still ahead whatever the kills before it hit: n=1 of any later point always is.
ORDER: tuple[tuple[str | None, int], ...] = (
    ("shard-sample", 400),
    ("shard-commit", 4),
    ("catalog-write", 1),
    (None, 0),
    ("train-step", 60),
    ("checkpoint-file", 6),
    ("metrics-push", 2),
    (None, 0),
    ("checkpoint-file", 6),
    ("stage-final", 1),
    (None, 0),
    ("mlflow-push", 4),
    ("register", 1),
)


@dataclass(frozen=True)
class Kill:
    """One planned kill."""

    point: str | None
    """Fault point (targeted kill), or None for a timed kill."""
    n: int = 0
    """Which hit of ``point`` in the attempt (1-based)."""
    delay_s: float = 0.0
    """Timed kills: seconds after the attempt starts."""

    def describe(self) -> str:
        """``point#n`` or ``t+Xs``."""
        return f"{self.point}#{self.n}" if self.point else f"t+{self.delay_s:.1f}s"


@dataclass
class Attempt:
    """What one start of the command did."""

    index: int
    """0-based attempt number."""
    planned: str
    """The kill planned for it (``describe()``), or ``none`` for the final clean attempt."""
    outcome: str
    """``killed`` (the kill landed), ``missed`` (the run finished before it), ``exit`` (no kill planned)."""
    returncode: int | None
    """Exit status (negative: signal)."""
    seconds: float
    """Wall time of the attempt."""
    landed: dict = field(default_factory=dict)
    """Targeted kills: the fired point, hit number and pid."""
    survivors: int = 0
    """Processes of the tree still alive one second after the kill (must be 0)."""


def plan_kills(k: int, seed: int, max_delay_s: float = 30.0) -> list[Kill]:
    """The first ``k`` kills of ``ORDER`` with seeded hit numbers and delays (13 cover shard writes,
    the catalog, training steps, checkpoint files, metrics, stage outputs, outbox pushes and model
    registration, plus three timed kills); beyond 13, ``ORDER`` repeats."""
    rng = random.Random(seed)
    kills: list[Kill] = []
    for i in range(k):
        point, cap = ORDER[i % len(ORDER)]
        if point is None:
            kills.append(Kill(None, delay_s=round(rng.uniform(3.0, max_delay_s), 1)))
        else:
            kills.append(Kill(point, n=rng.randint(1, cap)))
    return kills


def _tree(marker: str) -> list[int]:
    """Pids of processes whose environment holds ``marker`` (``MVLM_FAULTS=<folder>``)."""
    needle = marker.encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids


def kill_tree(marker: str, rounds: int = 20) -> int:
    """SIGKILL every process carrying ``marker`` until none is left; returns how many survived."""
    for _ in range(rounds):
        pids = _tree(marker)
        if not pids:
            return 0
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    return len(_tree(marker))


def _reap(marker: str, timeout_s: float = 1.0) -> int:
    """Processes of the tree still alive (zombies do not count) after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    alive = _alive(marker)
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = _alive(marker)
    return len(alive)


def _alive(marker: str) -> list[int]:
    out = []
    for pid in _tree(marker):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X"):
            out.append(pid)
    return out


def run_attempt(
    cmd: list[str], env: dict[str, str], faults_dir: Path, kill: Kill | None, index: int, log_path: Path,
    timeout_s: float,
) -> Attempt:  # fmt: skip
    """Start ``cmd`` once with ``kill`` planned; return what happened."""
    for stale in faults_dir.glob("*"):
        stale.unlink()
    (faults_dir / "plan.json").write_text(json.dumps({"point": kill.point, "n": kill.n} if kill else {}))
    marker = f"{ENV}={faults_dir}"
    started = time.monotonic()
    with log_path.open("ab") as out:
        out.write(f"\n===== attempt {index}: {kill.describe() if kill else 'none'} =====\n".encode())
        out.flush()
        proc = subprocess.Popen(
            cmd,
            env={**env, ENV: str(faults_dir)},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        while True:
            elapsed = time.monotonic() - started
            code = proc.poll()
            fired = faults_dir / "fired.json"
            if code is not None:
                kill_tree(marker)  # an exiting run may leave Ray processes behind
                _reap(marker)
                outcome = "missed" if kill else "exit"
                return Attempt(index, kill.describe() if kill else "none", outcome, code, elapsed)
            hit = fired.is_file() and kill is not None and kill.point is not None
            due = kill is not None and kill.point is None and elapsed >= kill.delay_s
            if hit or due or elapsed > timeout_s:
                landed = json.loads(fired.read_text()) if hit else {}
                kill_tree(marker)
                proc.wait()
                survivors = _reap(marker)
                if elapsed > timeout_s and not (hit or due):
                    raise TimeoutError(f"attempt {index} ran past {timeout_s}s; see {log_path}")
                seconds = time.monotonic() - started
                return Attempt(index, kill.describe(), "killed", proc.returncode, seconds, landed, survivors)
            time.sleep(0.05)


def chaos_run(
    cmd: list[str], kills: list[Kill], out_dir: Path, env: dict[str, str] | None = None,
    attempt_timeout_s: float = 1800.0,
) -> list[Attempt]:  # fmt: skip
    """Run ``cmd`` through the planned kills, restarting it after each, until an attempt exits.

    A kill the run did not reach is recorded as ``missed``: the run finished before it, so the kills
    after it are not tried (the caller decides whether enough landed). After the last kill the run
    is started once more to completion. An attempt that exits non-zero raises RuntimeError naming
    the log: a crash may cost time, never the run.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    faults_dir = out_dir / "faults"
    faults_dir.mkdir(exist_ok=True)
    log_path = out_dir / "attempts.log"
    base_env = dict(env if env is not None else os.environ)
    attempts: list[Attempt] = []
    for kill in [*kills, None]:
        attempt = run_attempt(cmd, base_env, faults_dir, kill, len(attempts), log_path, attempt_timeout_s)
        attempts.append(attempt)
        log.info(
            "attempt %d: %s -> %s (rc %s, %.1fs)",
            attempt.index, attempt.planned, attempt.outcome, attempt.returncode, attempt.seconds,
        )  # fmt: skip
        (out_dir / "attempts.json").write_text(json.dumps([asdict(a) for a in attempts], indent=2))
        if attempt.outcome != "killed" and attempt.returncode != 0:
            raise RuntimeError(
                f"attempt {attempt.index} failed with status {attempt.returncode}; see {log_path}"
            )
        if attempt.outcome != "killed":
            break  # the run completed
    return attempts


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m tasks.testkit.chaos --kills K --seed S --out DIR -- COMMAND...``."""
    parser = argparse.ArgumentParser(
        prog="python -m tasks.testkit.chaos", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--kills", type=int, default=13, help="kills to plan (default 13)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill plan")
    parser.add_argument("--out", type=Path, default=Path("chaos"), help="attempt log and report folder")
    parser.add_argument("--max-delay", type=float, default=30.0, help="latest timed kill, in seconds")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, after --")
    args = parser.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        parser.error("give the command to run after --")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    kills = plan_kills(args.kills, args.seed, max_delay_s=args.max_delay)
    log.info("plan: %s (points: %s)", ", ".join(k.describe() for k in kills), ", ".join(POINTS))
    attempts = chaos_run(cmd, kills, args.out)
    landed = sum(a.outcome == "killed" for a in attempts)
    log.info("%d of %d kills landed; the run then completed; report in %s", landed, len(kills), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
