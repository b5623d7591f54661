"""The device-benchmark flow for real: a Prefect API, a process worker on the host-cpu pool, MLflow.

* a real Prefect server (``prefect_test_harness``), the ``device-benchmark/host-cpu`` deployment,
  and a real ``prefect worker start --type process`` subprocess polling the pool; the flow run
  fetches the tiny quant from a real ``mlflow server`` and pushes its result there;
* the CLI from a clean work dir: ``mvlm export`` -> ``mvlm quantize`` -> ``mvlm bench --local`` ->
  ``mvlm bench report``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from tasks.lineage import tags as tag
from tasks.lineage.quant_artifacts import log_quant
from tasks.lineage.tracking import experiment_id

pytest_plugins = ("export_fixtures",)
pytestmark = pytest.mark.usefixtures("fast_mlflow_client", "one_torch_thread")

QUICK = {"lm_tokens": 32, "vlm_tokens": 16, "pp_tokens": 64, "tg_tokens": 16, "repetitions": 2, "threads": 1}


def _bench_runs(url: str, quant_run_id: str) -> list:
    client = MlflowClient(tracking_uri=url)
    return client.search_runs(
        [experiment_id(client)],
        filter_string=f"tags.`{tag.KIND}` = 'bench' and tags.`mvlm.quant_run_id` = '{quant_run_id}'",
    )


def _start_worker(api_url: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    prefect = str(Path(sys.executable).parent / "prefect")
    command = [prefect, "worker", "start", "--pool", "host-cpu", "--type", "process", "--name", "test-runner"]
    with open(log, "ab") as out:
        return subprocess.Popen(
            command, env={**os.environ, **env, "PREFECT_API_URL": api_url}, stdout=out, stderr=out,
            start_new_session=True, cwd=str(Path(__file__).resolve().parents[1]),
        )  # fmt: skip


@pytest.mark.slow
def test_process_worker_runs_the_deployed_flow(mlflow_server, tiny_quant, tmp_path: Path) -> None:
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    from flows.device_benchmark import deploy, submit

    quant_run = log_quant(tiny_quant, mlflow_server.url)
    env = {"MLFLOW_TRACKING_URI": mlflow_server.url, "MVLM_WORK_DIR": str(tmp_path / "runner"),
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}  # fmt: skip
    log = tmp_path / "worker.log"
    with prefect_test_harness(server_startup_timeout=120):
        assert list(deploy(["host-cpu"], env=env)) == ["host-cpu"]
        worker = _start_worker(PREFECT_API_URL.value(), env, log)
        try:
            first = submit(quant_run, "host-cpu", QUICK, wait_s=300)
            second = submit(quant_run, "host-cpu", QUICK, wait_s=300)
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(timeout=30)
        for flow_run in (first, second):
            assert flow_run.state is not None and flow_run.state.is_completed(), log.read_text()[-3000:]
    runs = _bench_runs(mlflow_server.url, quant_run)
    assert len(runs) == 1, "the second submission must find the first result, not push another"
    tags, metrics = runs[0].data.tags, runs[0].data.metrics
    assert tags["mlflow.parentRunId"] == quant_run and tags["device"] == "host-cpu"
    assert tags["backend"] == "llama-cpp-python" and tags["threads"] == "1" and tags["quant_type"] == "q4_0"
    assert tags["llama_cpp_build"].startswith("llama-cpp-python") and tags["runner_host"] and tags["soc"]
    assert (
        metrics["lm.eval_tokens"] == 32 and metrics["vlm.eval_tokens"] == 16 and metrics["pp64.mean_tps"] > 0
    )
    assert not list((tmp_path / "runner" / "runs" / "outbox").glob("*.json"))


@pytest.mark.slow
def test_cli_export_quantize_bench_report(
    mlflow_server, trained_vlm: Path, tmp_path: Path, monkeypatch
) -> None:
    from prefect.testing.utilities import prefect_test_harness

    from flows.cli import app

    monkeypatch.setenv("MVLM_WORK_DIR", str(tmp_path / "wd"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    done = runner.invoke(app, ["export", str(trained_vlm), str(tmp_path / "export")])
    assert done.exit_code == 0, done.output
    assert "agreement_rate" in done.output
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert manifest["checks"]["logits"]["argmax_agreement"] >= 0.9
    done = runner.invoke(app, ["quantize", str(tmp_path / "export" / "model-f16.gguf"), "--type", "q8_0"])
    assert done.exit_code == 0, done.output
    quant = tmp_path / "export" / "quant" / "q8_0"
    settings = [arg for key, value in QUICK.items() for arg in ("--set", f"{key}={value}")]
    started = time.monotonic()
    with prefect_test_harness(server_startup_timeout=120):  # a clean clone uses Prefect's ephemeral API
        done = runner.invoke(app, ["bench", str(quant), "--pool", "host-cpu", "--local", *settings])
    assert done.exit_code == 0, done.output
    print(f"mvlm bench --local took {time.monotonic() - started:.1f}s")
    assert "pushed" in done.output
    done = runner.invoke(app, ["bench", "report", "--chart", str(tmp_path / "chart.png")])
    assert done.exit_code == 0, done.output
    assert "host-cpu / q8_0" in done.output and "snapdragon-888 / q4_k_s" in done.output
    assert "21.54" in done.output and (tmp_path / "chart.png").stat().st_size > 1000
