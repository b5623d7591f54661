"""Where things live: roots and service addresses, read from the environment at call time.

Embedded defaults make one machine enough (folders under the working directory, MLflow on SQLite,
local Ray, Prefect's ephemeral API). The same code runs at scale by setting ``MVLM_DATA_ROOT``,
``MVLM_RUNS_ROOT``, ``MLFLOW_TRACKING_URI``, ``RAY_ADDRESS`` and ``PREFECT_API_URL``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    """Roots and addresses for one process."""

    work_dir: Path
    """Base for the embedded defaults (``MVLM_WORK_DIR``, default ``./work_dir``)."""
    data_root: Path
    """Dataset builds, samples and the DuckDB catalog (``MVLM_DATA_ROOT``, default ``<work_dir>/data``)."""
    runs_root: Path
    """Training stages, exports, quantizations (``MVLM_RUNS_ROOT``, default ``<work_dir>/runs``)."""
    mlflow_uri: str
    """MLflow tracking URI (``MLFLOW_TRACKING_URI``, default SQLite file under ``work_dir``)."""
    ray_address: str | None
    """Ray cluster address (``RAY_ADDRESS``); None starts a local Ray."""

    @property
    def catalog_path(self) -> Path:
        """The DuckDB catalog file."""
        return self.data_root / "catalog.duckdb"


def get_settings() -> Settings:
    """Settings from the current environment (nothing is created here)."""
    work = Path(os.environ.get("MVLM_WORK_DIR", "work_dir")).absolute()
    data = Path(os.environ.get("MVLM_DATA_ROOT", work / "data")).absolute()
    runs = Path(os.environ.get("MVLM_RUNS_ROOT", work / "runs")).absolute()
    mlflow_uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{work / 'mlflow.db'}"
    return Settings(work, data, runs, mlflow_uri, os.environ.get("RAY_ADDRESS") or None)
