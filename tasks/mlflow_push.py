"""Results into MLflow exactly once, through an on-disk outbox; quantized artifacts in and out of MLflow.

A result to send is a ``Payload`` (identity, tags, params, metrics with their timestamps, small
JSON artifacts). ``Outbox.put`` writes it atomically as ``<runs_root>/outbox/<identity>.json``
before anything is sent; ``flush`` pushes every pending payload and deletes its file only once the
run is complete in MLflow. ``push`` is idempotent: it looks the run up by the ``mvlm.identity`` tag
before creating one (the tag is set in the same request that creates the run), re-sends metrics
with their original timestamps (MLflow drops exact duplicates) and marks the run complete last.
So a server that dies mid-push and comes back ends with exactly one complete run per identity.

Quantized GGUFs travel through MLflow too: ``log_quant`` logs a quant folder's files as
artifacts of a run tagged with the quant identity and each file's sha256; ``fetch_quant``
downloads them by run id into a local cache and verifies every sha256 before use.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.identity import atomic_write_json, read_json, sha256_file
from tasks.settings import get_settings
from tasks.tracking import EXPERIMENT, IDENTITY_TAG

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

    from tasks.quantize import QuantResult

log = logging.getLogger(__name__)

"""MLflow experiment of quantized models and their device benchmarks."""
COMPLETE_TAG = "mvlm.push_complete"
KIND_TAG = "mvlm.kind"
SHA_TAG_PREFIX = "mvlm.sha256."
QUANT_ARTIFACT_DIR = "gguf"


class MlflowUnavailable(ConnectionError):
    """The tracking server cannot be reached (results stay in the outbox)."""


# --- connection -----------------------------------------------------------------------------------


def tracking_uri(uri: str | None = None) -> str:
    """``uri``, else ``MLFLOW_TRACKING_URI``, else SQLite under the work dir (tasks.settings)."""
    return uri or get_settings().mlflow_uri


def reachable(uri: str, timeout: float = 3.0) -> bool:
    """True for local stores; for an HTTP server, whether ``/health`` answers within ``timeout``."""
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def client(uri: str) -> MlflowClient:
    """An MLflow client bound to ``uri`` (nothing global is changed)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(mlflow: MlflowClient, name: str = EXPERIMENT) -> str:
    """The experiment's id, creating it when missing (local stores keep artifacts beside the database)."""
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    uri = mlflow.tracking_uri
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


def find_run(mlflow: MlflowClient, exp_id: str, identity: str) -> Run | None:
    """The run tagged with ``identity`` (the newest if, against the rules, there are several)."""
    runs = mlflow.search_runs(
        [exp_id],
        filter_string=f"tags.`{IDENTITY_TAG}` = '{identity}'",
        order_by=["attributes.start_time DESC"],
    )
    return runs[0] if runs else None


# --- payloads and the outbox --------------------------------------------------------------------------


@dataclass
class Payload:
    """One result to record as one MLflow run."""

    identity: str
    """Identity of the result (``mvlm.identity`` tag): what makes pushes idempotent."""
    run_name: str
    """Run name shown in the UI."""
    tags: dict[str, str] = field(default_factory=dict)
    """Tags (device, soc, backend, threads, quant type, llama.cpp build, runner host, links)."""
    params: dict[str, str] = field(default_factory=dict)
    """Parameters (settings of the measurement)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Metrics, logged at ``timestamp_ms``."""
    artifacts: dict[str, Any] = field(default_factory=dict)
    """Small JSON artifacts by file name."""
    experiment: str = EXPERIMENT
    """Experiment name."""
    timestamp_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    """When the result was measured; fixed so re-sent metrics are exact duplicates."""


class Outbox:
    """Pending payloads on disk, one atomically written JSON file per identity."""

    def __init__(self, folder: str | Path | None = None) -> None:
        self.folder = Path(folder) if folder else get_settings().runs_root / "outbox"

    def put(self, payload: Payload) -> Path:
        """Store ``payload`` (replacing a pending one with the same identity)."""
        return atomic_write_json(self.folder / f"{payload.identity}.json", dataclasses.asdict(payload))

    def pending(self) -> list[Payload]:
        """Every stored payload, oldest first."""
        if not self.folder.is_dir():
            return []
        files = sorted(self.folder.glob("*.json"), key=lambda p: p.stat().st_mtime)
        return [Payload(**read_json(p)) for p in files]

    def remove(self, identity: str) -> None:
        """Forget a payload once MLflow has it."""
        (self.folder / f"{identity}.json").unlink(missing_ok=True)


@dataclass
class FlushReport:
    """What a flush did."""

    sent: dict[str, str] = field(default_factory=dict)
    """Identity -> run id of payloads now complete in MLflow."""
    kept: list[str] = field(default_factory=list)
    """Identities still waiting (server unreachable or a push failed)."""


def flush(
    outbox: Outbox, uri: str | None = None, on_step: Callable[[str], None] | None = None
) -> FlushReport:
    """Push every pending payload; keep the ones that could not be sent."""
    uri = tracking_uri(uri)
    report = FlushReport()
    pending = outbox.pending()
    if pending and not reachable(uri):
        log.warning("MLflow at %s is unreachable; %d result(s) stay in %s", uri, len(pending), outbox.folder)
        report.kept = [p.identity for p in pending]
        return report
    for payload in pending:
        try:
            report.sent[payload.identity] = push(payload, uri, on_step)
        except Exception as err:
            log.warning("push of %s failed (%s); kept in %s", payload.identity, err, outbox.folder)
            report.kept.append(payload.identity)
            continue
        outbox.remove(payload.identity)
    return report


def push(payload: Payload, uri: str, on_step: Callable[[str], None] | None = None) -> str:
    """Record ``payload`` as one complete run (idempotent); return the run id."""
    from mlflow.entities import Metric, Param, RunTag

    step = on_step or (lambda name: None)
    mlflow = client(uri)
    exp_id = experiment_id(mlflow, payload.experiment)
    run = find_run(mlflow, exp_id, payload.identity)
    if run is not None and run.data.tags.get(COMPLETE_TAG) == "true":
        log.info("result %s is already in MLflow (run %s)", payload.identity, run.info.run_id)
        return run.info.run_id
    if run is None:
        tags = {**payload.tags, IDENTITY_TAG: payload.identity, "mlflow.runName": payload.run_name}
        run = mlflow.create_run(exp_id, start_time=payload.timestamp_ms, tags=tags, run_name=payload.run_name)
    run_id = run.info.run_id
    step("created")
    metrics = [Metric(k, float(v), payload.timestamp_ms, 0) for k, v in sorted(payload.metrics.items())]
    params = [Param(k, str(v)) for k, v in sorted(payload.params.items())]
    mlflow.log_batch(
        run_id, metrics=metrics, params=params, tags=[RunTag(k, v) for k, v in payload.tags.items()]
    )
    step("logged")
    for name, content in payload.artifacts.items():
        mlflow.log_text(run_id, json.dumps(content, indent=2, sort_keys=True, default=str), name)
    step("artifacts")
    mlflow.set_tag(run_id, COMPLETE_TAG, "true")
    mlflow.set_terminated(run_id, "FINISHED")
    log.info("pushed result %s to MLflow run %s", payload.identity, run_id)
    return run_id


# --- quantized artifacts --------------------------------------------------------------------------


def log_quant(result: QuantResult, uri: str | None = None, experiment: str = EXPERIMENT) -> str:
    """Log a quant folder's GGUFs as artifacts of the run tagged with its identity (idempotent)."""
    mlflow = client(tracking_uri(uri))
    exp_id = experiment_id(mlflow, experiment)
    run = find_run(mlflow, exp_id, result.quant_id)
    if run is not None and run.data.tags.get(COMPLETE_TAG) == "true":
        return run.info.run_id
    manifest = result.manifest
    tags = _quant_tags(result)
    if run is None:
        run = mlflow.create_run(
            exp_id, tags=tags, run_name=f"quant-{result.quant_type}-{result.quant_id[:8]}"
        )
    run_id = run.info.run_id
    for path in sorted(result.out_dir.iterdir()):
        if path.is_file():
            mlflow.log_artifact(run_id, str(path), QUANT_ARTIFACT_DIR)
    mlflow.log_batch(run_id, metrics=_quant_metrics(manifest))
    mlflow.set_tag(run_id, COMPLETE_TAG, "true")
    mlflow.set_terminated(run_id, "FINISHED")
    log.info("logged quant %s (%s) to MLflow run %s", result.quant_id, result.quant_type, run_id)
    return run_id


def _quant_tags(result: QuantResult) -> dict[str, str]:
    manifest = result.manifest
    source = manifest.get("inputs", {}).get("source", {})
    tags = {
        IDENTITY_TAG: result.quant_id,
        KIND_TAG: "quant",
        "mvlm.quant_type": result.quant_type,
        "mvlm.model": str(manifest.get("model", "")),
        "mvlm.llm_file": manifest["llm"],
        "mvlm.llama_cpp_build": str(manifest.get("llama_cpp", "")),
        "mvlm.export_id": source.get("export_id", ""),
    }
    if manifest.get("mmproj"):
        tags["mvlm.mmproj_file"] = manifest["mmproj"]
    tags |= {f"{SHA_TAG_PREFIX}{name}": digest for name, digest in manifest["files"].items()}
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
    if tags.get(KIND_TAG) != "quant":
        raise ArtifactError(f"MLflow run {run_id} is not a quant run (tag {KIND_TAG}={tags.get(KIND_TAG)!r})")
    expected = {k.removeprefix(SHA_TAG_PREFIX): v for k, v in tags.items() if k.startswith(SHA_TAG_PREFIX)}
    folder = Path(cache_root or get_settings().runs_root / "device-cache") / tags[IDENTITY_TAG]
    if not _verified(folder, expected):
        _download(mlflow, run_id, folder)
        bad = [name for name in expected if not _verified(folder, {name: expected[name]})]
        if bad:
            raise ArtifactError(
                f"artifacts {bad} of run {run_id} do not match their sha256 tags; refusing them"
            )
    mmproj = tags.get("mvlm.mmproj_file")
    return FetchedQuant(
        run_id, tags[IDENTITY_TAG], tags["mvlm.quant_type"], folder / tags["mvlm.llm_file"],
        folder / mmproj if mmproj else None, tags.get("mvlm.export_id", ""), tags.get("mvlm.model", ""),
    )  # fmt: skip


def _verified(folder: Path, expected: dict[str, str]) -> bool:
    return bool(expected) and all(
        (folder / n).is_file() and sha256_file(folder / n) == d for n, d in expected.items()
    )


def _download(mlflow: MlflowClient, run_id: str, folder: Path) -> None:
    import shutil
    import tempfile

    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        local = Path(mlflow.download_artifacts(run_id, QUANT_ARTIFACT_DIR, tmp))
        staged = Path(tmp) / "staged"
        shutil.move(str(local), staged)
        if folder.exists():
            shutil.rmtree(folder)
        staged.rename(folder)
    log.info("fetched quant artifacts of run %s into %s", run_id, folder)
