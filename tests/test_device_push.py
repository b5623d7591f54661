"""Results into a real ``mlflow server`` exactly once, through the on-disk outbox; GGUFs through MLflow."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from tasks.lineage import tags as tag
from tasks.lineage.push import Outbox, Payload, flush, push
from tasks.lineage.quant_artifacts import ArtifactError, fetch_quant, log_quant
from tasks.lineage.tracking import experiment_id

pytest_plugins = ("export_fixtures",)
pytestmark = pytest.mark.usefixtures("fast_mlflow_client")


def _payload(identity: str) -> Payload:
    return Payload(
        identity=identity,
        run_name=f"bench-test-{identity}",
        tags={"device": "host-cpu", "quant_type": "q4_0"},
        params={"threads": "1"},
        metrics={"lm.eval_tps": 123.5, "pp512.mean_tps": 4567.0},
        artifacts={"bench_result.json": {"identity": identity}},
    )


def _runs(url: str, identity: str) -> list:
    client = MlflowClient(tracking_uri=url)
    return client.search_runs([experiment_id(client)], filter_string=f"tags.`{tag.IDENTITY}` = '{identity}'")


def _assert_one_complete_copy(url: str, identity: str) -> None:
    runs = _runs(url, identity)
    assert len(runs) == 1, f"{len(runs)} runs carry identity {identity}"
    run = runs[0]
    assert run.data.tags[tag.COMPLETE] == "true" and run.info.status == "FINISHED"
    client = MlflowClient(tracking_uri=url)
    for key, value in _payload(identity).metrics.items():
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.value for m in history] == [value], f"{key} logged {len(history)} times"
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["bench_result.json"]


def test_push_twice_gives_one_run(mlflow_server) -> None:
    first = push(_payload("twice"), mlflow_server.url)
    assert push(_payload("twice"), mlflow_server.url) == first
    _assert_one_complete_copy(mlflow_server.url, "twice")


def test_unreachable_mlflow_keeps_results_on_disk(mlflow_server, tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox")
    outbox.put(_payload("offline"))
    report = flush(outbox, "http://127.0.0.1:9")  # nothing listens on the discard port
    assert report.kept == ["offline"] and not report.sent
    assert (tmp_path / "outbox" / "offline.json").is_file()
    report = flush(outbox, mlflow_server.url)
    assert list(report.sent) == ["offline"] and outbox.pending() == []
    _assert_one_complete_copy(mlflow_server.url, "offline")


@pytest.mark.parametrize("stop_after", ["created", "logged", "artifacts"])
def test_server_stopped_mid_push_then_exactly_one_copy(
    mlflow_server, tmp_path: Path, stop_after: str
) -> None:
    identity = f"mid-push-{stop_after}"
    outbox = Outbox(tmp_path / "outbox")
    outbox.put(_payload(identity))

    def stop_server(step: str) -> None:
        if step == stop_after:
            mlflow_server.stop()

    try:
        report = flush(outbox, mlflow_server.url, on_step=stop_server)
    finally:
        if not mlflow_server.healthy():
            mlflow_server.start()
    assert report.kept == [identity] and len(outbox.pending()) == 1
    report = flush(outbox, mlflow_server.url)
    assert list(report.sent) == [identity] and outbox.pending() == []
    assert flush(outbox, mlflow_server.url).sent == {}
    _assert_one_complete_copy(mlflow_server.url, identity)


def test_quant_artifacts_round_trip_and_sha_check(mlflow_server, tiny_quant, tmp_path: Path) -> None:
    run_id = log_quant(tiny_quant, mlflow_server.url)
    assert log_quant(tiny_quant, mlflow_server.url) == run_id
    fetched = fetch_quant(run_id, tmp_path / "cache", mlflow_server.url)
    assert fetched.llm.read_bytes() == tiny_quant.llm.read_bytes()
    assert fetched.mmproj is not None and fetched.mmproj.read_bytes() == tiny_quant.mmproj.read_bytes()
    assert (fetched.quant_id, fetched.quant_type) == (tiny_quant.quant_id, "q4_0")
    fetched.llm.write_bytes(b"tampered")
    assert (
        fetch_quant(run_id, tmp_path / "cache", mlflow_server.url).llm.read_bytes()
        == tiny_quant.llm.read_bytes()
    )
    MlflowClient(tracking_uri=mlflow_server.url).set_tag(
        run_id, f"mvlm.sha256.{tiny_quant.llm.name}", "0" * 64
    )
    with pytest.raises(ArtifactError, match="do not match their sha256"):
        fetch_quant(run_id, tmp_path / "other", mlflow_server.url)
    MlflowClient(tracking_uri=mlflow_server.url).set_tag(
        run_id, f"mvlm.sha256.{tiny_quant.llm.name}", tiny_quant.manifest["files"][tiny_quant.llm.name]
    )
