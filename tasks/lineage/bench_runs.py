"""Device benchmark results in MLflow: a result as an outbox payload, and the rows of the bench report.

A benchmark result (``tasks.ship.bench.BenchResult``) becomes one run, a child of the quant run it
measured, tagged so that the report and the lineage graph find it; the report reads every complete
bench run back and sets the paper's device results beside them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tasks.lineage import tags as tag
from tasks.lineage.push import Payload
from tasks.lineage.tracking import client, experiment_id, tracking_uri
from tasks.ship.bench.report import PAPER_RESULTS
from tasks.ship.bench.results import BenchResult


def bench_payload(result: BenchResult, quant_run_id: str, export_id: str = "", model: str = "") -> Payload:
    """The MLflow payload of a result: a child run of the quant run, tagged for reports."""
    tags = {
        tag.KIND: "bench",
        "mlflow.parentRunId": quant_run_id,
        tag.QUANT_RUN_ID: quant_run_id,
        tag.QUANT_ID: result.quant_id,
        tag.EXPORT_ID: export_id,
        "model": model,
        "device": result.device,
        "soc": result.soc,
        "backend": result.backend,
        "transport": result.transport,
        "threads": str(result.settings["threads"]),
        "quant_type": result.quant_type,
        "llama_cpp_build": result.measurement.llama_cpp,
        "runner_host": result.runner_host,
        "device_host": result.device_host,
    }
    return Payload(
        identity=result.identity,
        run_name=f"bench-{result.device}-{result.quant_type}",
        tags=tags,
        params={k: str(v) for k, v in result.settings.items()},
        metrics=result.metrics(),
        artifacts={"bench_result.json": dataclasses.asdict(result)},
    )


def report_rows(uri: str | None = None) -> list[dict[str, Any]]:
    """Our bench results from MLflow (one row per complete run) followed by the paper's rows."""
    mlflow = client(tracking_uri(uri))
    runs = mlflow.search_runs(
        [experiment_id(mlflow)],
        filter_string=f"tags.`{tag.KIND}` = 'bench' and tags.`{tag.COMPLETE}` = 'true'",
    )
    rows = [
        {"source": "ours", "device": r.data.tags.get("device", "?"),
         "quant_type": r.data.tags.get("quant_type", "?"),
         "model": r.data.tags.get("model", r.data.tags.get(tag.QUANT_ID, "?")[:8]),
         "backend": r.data.tags.get("backend", "?"), "run_id": r.info.run_id, **r.data.metrics}
        for r in runs
    ]  # fmt: skip
    paper = [{"source": "paper", "backend": "llama.cpp", "run_id": "", **p} for p in PAPER_RESULTS]
    return rows + paper
