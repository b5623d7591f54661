"""Quantized GGUFs in and out of MLflow.

``log_quant`` logs a quant folder's files as artifacts of a run tagged with the quant identity and
each file's sha256 (idempotent, under the outbox's open-a-run and converge rules of
``tasks.lineage.push``); ``fetch_quant`` downloads them by run id into a local cache and verifies
every sha256 before use.
"""

from __future__ import annotations

import logging
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.core.identity import sha256_file
from tasks.core.settings import get_settings
from tasks.lineage import tags as tag
from tasks.lineage.tracking import (
    EXPERIMENT,
    client,
    experiment_id,
    tracking_uri,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

    from tasks.ship.quantize import QuantResult

from tasks.lineage.push import _converge, _open_run

log = logging.getLogger(__name__)

QUANT_ARTIFACT_DIR = "gguf"
"""Artifact folder of a quant run's files."""


def log_quant(result: QuantResult, uri: str | None = None, experiment: str = EXPERIMENT) -> str:
    """Log a quant folder's GGUFs as artifacts of the run tagged with its identity (idempotent; two
    processes of one host logging the same quant take turns)."""
    from tasks.core import faults
    from tasks.core.locks import exclusive

    mlflow = client(tracking_uri(uri))
    exp_id = experiment_id(mlflow, experiment)
    owner = socket.gethostname()  # under the lock below: a rerun continues what a killed process left
    tags = _quant_tags(result)

    def create(extra: dict[str, str]) -> Run:
        name = f"quant-{result.quant_type}-{result.quant_id[:8]}"
        return mlflow.create_run(exp_id, tags={**tags, **extra}, run_name=name)

    with exclusive(result.out_dir.parent / f".{result.quant_id}.mlflow.lock"):
        run, complete = _open_run(mlflow, exp_id, result.quant_id, owner, create)
        if complete:
            return run.info.run_id
        run_id = run.info.run_id
        for path in sorted(result.out_dir.iterdir()):
            if path.is_file():
                mlflow.log_artifact(run_id, str(path), QUANT_ARTIFACT_DIR)
                faults.hit("mlflow-push")
        logged = set(run.data.metrics)  # a resumed run keeps the metrics it has (exactly once)
        metrics = [m for m in _quant_metrics(result.manifest) if m.key not in logged]
        if metrics:
            mlflow.log_batch(run_id, metrics=metrics)
        faults.hit("mlflow-push")
        mlflow.set_terminated(run_id, "FINISHED")
        mlflow.set_tag(run_id, tag.COMPLETE, "true")
        run_id = _converge(mlflow, exp_id, result.quant_id, owner)
    log.debug("logged quant %s (%s) to MLflow run %s", result.quant_id, result.quant_type, run_id)
    return run_id


def _quant_tags(result: QuantResult) -> dict[str, str]:
    manifest = result.manifest
    source = manifest.get("inputs", {}).get("source", {})
    tags = {
        tag.IDENTITY: result.quant_id,
        tag.KIND: "quant",
        tag.QUANT_TYPE: result.quant_type,
        tag.MODEL: str(manifest.get("model", "")),
        tag.LLM_FILE: manifest["llm"],
        tag.LLAMA_CPP_BUILD: str(manifest.get("llama_cpp", "")),
        tag.EXPORT_ID: source.get("export_id", ""),
    }
    if manifest.get("mmproj"):
        tags[tag.MMPROJ_FILE] = manifest["mmproj"]
    tags |= {f"{tag.SHA_PREFIX}{name}": digest for name, digest in manifest["files"].items()}
    return tags


def _quant_metrics(manifest: dict[str, Any]) -> list:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    ppl = manifest.get("checks", {}).get("perplexity", {})
    values = {
        "size_bytes": manifest.get("size_bytes"),
        "perplexity": ppl.get("perplexity"),
        "reference_perplexity": ppl.get("reference_perplexity"),
        "perplexity_ratio": ppl.get("ratio"),
    }
    return [Metric(k, float(v), now, 0) for k, v in values.items() if v is not None]


@dataclass
class FetchedQuant:
    """Quantized artifacts fetched from MLflow and verified."""

    run_id: str
    """The quant run they came from."""
    quant_id: str
    """Quant identity (tag)."""
    quant_type: str
    """llama.cpp type name."""
    llm: Path
    """Local language-model GGUF."""
    mmproj: Path | None
    """Local mmproj GGUF (None for a language-model-only quant)."""
    export_id: str
    """Export the quant was made from."""
    model: str
    """Model name (the GGUF's general.name, e.g. the config row)."""


class ArtifactError(ValueError):
    """Fetched artifacts that do not match the sha256 recorded on their run."""


def fetch_quant(run_id: str, cache_root: str | Path | None = None, uri: str | None = None) -> FetchedQuant:
    """Download a quant run's GGUFs (unless a verified copy is cached) and check every sha256."""
    mlflow = client(tracking_uri(uri))
    tags = mlflow.get_run(run_id).data.tags
    if tags.get(tag.KIND) != "quant":
        raise ArtifactError(f"MLflow run {run_id} is not a quant run (tag {tag.KIND}={tags.get(tag.KIND)!r})")
    expected = {k.removeprefix(tag.SHA_PREFIX): v for k, v in tags.items() if k.startswith(tag.SHA_PREFIX)}
    folder = Path(cache_root or get_settings().runs_root / "device-cache") / tags[tag.IDENTITY]
    if not _verified(folder, expected):
        _download(mlflow, run_id, folder)
        bad = [name for name in expected if not _verified(folder, {name: expected[name]})]
        if bad:
            raise ArtifactError(
                f"artifacts {bad} of run {run_id} do not match their sha256 tags; refusing them"
            )
    mmproj = tags.get(tag.MMPROJ_FILE)
    return FetchedQuant(
        run_id, tags[tag.IDENTITY], tags[tag.QUANT_TYPE], folder / tags[tag.LLM_FILE],
        folder / mmproj if mmproj else None, tags.get(tag.EXPORT_ID, ""), tags.get(tag.MODEL, ""),
    )  # fmt: skip


def _verified(folder: Path, expected: dict[str, str]) -> bool:
    return bool(expected) and all(
        (folder / n).is_file() and sha256_file(folder / n) == d for n, d in expected.items()
    )


def _download(mlflow: MlflowClient, run_id: str, folder: Path) -> None:

    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        local = Path(mlflow.download_artifacts(run_id, QUANT_ARTIFACT_DIR, tmp))
        staged = Path(tmp) / "staged"
        shutil.move(str(local), staged)
        if folder.exists():
            shutil.rmtree(folder)
        staged.rename(folder)
    log.debug("fetched quant artifacts of run %s into %s", run_id, folder)
