"""What a training stage's workers are handed (``StagePlan``, plain data) and what both the driver and
the workers do with it: the loader config round trip, the metric rows, the checkpoint repair."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tasks.train.loader import LoaderConfig, Source

log = logging.getLogger(__name__)
REPAIRED = ".checkpoints-repaired"
"""Marker: the driver just repaired the checkpoints (rank 0 removes it on the workers' first start)."""


class StageError(RuntimeError):
    """A stage that cannot start or did not finish; the message names the stage and what to do."""


@dataclass(frozen=True)
class StagePlan:
    """Everything a worker needs, as plain data."""

    recipe: str
    """Recipe name."""
    stage: dict[str, Any]
    """StageConfig as a dict."""
    stage_id: str
    """Identity: stage config, input builds, init, trainer version."""
    out_dir: str
    """Stage folder."""
    init: dict[str, str]
    """``{"kind": "scratch"|"checkpoint", "path": ...}``."""
    tokenizer_path: str
    """Tokenizer folder for the model."""
    total_steps: int
    """Optimizer steps."""
    loader: dict[str, Any]
    """LoaderConfig as a dict."""
    deepspeed: dict[str, Any]
    """Generated DeepSpeed config."""
    builds: list[dict[str, Any]]
    """BuildRef dicts."""
    mlflow_uri: str
    """Tracking URI for rank 0."""
    mlflow_run_id: str
    """The stage's MLflow run."""
    kill_at_step: int | None = None
    """Chaos testing only: workers exit abruptly after this step (not part of the identity)."""
    nan_at_step: int | None = None
    """Chaos testing only: the loss of this step becomes NaN (not part of the identity)."""

    @property
    def out(self) -> Path:
        """Stage folder."""
        return Path(self.out_dir)


def loader_dict(cfg: LoaderConfig) -> dict[str, Any]:
    """The plan's plain-data form of a loader config."""
    data = asdict(cfg)
    data["sources"] = [asdict(s) for s in cfg.sources]
    return data


def loader_from_dict(data: dict[str, Any]) -> LoaderConfig:
    """Inverse of the plan's loader dict."""
    sources_ = tuple(Source(**{**s, "shards": tuple(s["shards"])}) for s in data["sources"])
    return LoaderConfig(**{**data, "sources": sources_})


def read_metric_rows(path: Path) -> list[dict[str, Any]]:
    """Metric rows of a metrics.jsonl; a torn last line (crash mid-append) is ignored."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s: ignoring a torn line", path)
    return rows


def check_checkpoints(plan: StagePlan) -> Any:
    """Before a resume: move unusable newest checkpoints aside and point ``latest`` at the newest good
    one (WARNINGs say what and why); returns the ``model.ds_checkpoint.CheckpointRepair``."""
    from model.ds_checkpoint import CheckpointLayout, repair_checkpoints

    ds = plan.deepspeed
    layout = CheckpointLayout(
        world_size=plan.stage["num_workers"],
        zero_stage=int(ds.get("zero_optimization", {}).get("stage", 0)),
        bf16=bool(ds.get("bf16", {}).get("enabled", False)),
    )
    report = repair_checkpoints(plan.out / "checkpoints", layout)
    if report.repaired:
        log.warning(
            "stage %s: checkpoints repaired before resuming: %s; resuming from %s",
            plan.stage["name"], report.moved or "latest rewritten", report.resume_tag or "scratch",
        )  # fmt: skip
    return report
