"""The tiny recipe end to end through the real ``retrain`` flow.

Real Prefect (test harness), real Ray Train with 2 workers and DeepSpeed on CPU, real img2dataset,
real llama.cpp, MLflow on SQLite. One retrain per module; the tests read what it produced. The
accuracy assertion proves that image splicing, label masking and freezing work together: a bug in
any of them leaves the colour and shape answers at chance.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tasks.lineage import tags as tag

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local", "prefect_api")]


def _children(mlflow, parent_id: str) -> list:
    from tasks.lineage import tracking

    exp = tracking.experiment_id(mlflow, tracking.EXPERIMENT)
    return mlflow.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


# --- issue 4: every stage learns -------------------------------------------------------------------


def test_every_stage_runs_and_its_loss_falls(retrained: dict) -> None:
    stages = {s["stage"]: s for s in retrained["stages"]}
    assert list(stages) == ["llm-pretrain", "vlm-align", "vlm-instruct"]
    for name, s in stages.items():
        assert s["final_loss"] < 0.7 * s["first_loss"], name
        assert (Path(s["final"]) / "model.safetensors").is_file()
    assert stages["llm-pretrain"]["evaluation"]["perplexity"] < 1024 / 20  # uniform would be 1024


def test_the_tiny_vlm_answers_colour_and_shape_far_above_chance(retrained: dict) -> None:
    from tasks.testkit.samples import SampleConfig

    metrics = next(s for s in retrained["stages"] if s["stage"] == "vlm-instruct")["evaluation"]
    chance_colour, chance_shape = 1 / len(SampleConfig().colours), 1 / len(SampleConfig().kinds)
    assert metrics["accuracy/colour"] >= 2.5 * chance_colour, metrics
    assert metrics["accuracy/shape"] >= 1.7 * chance_shape, metrics


def test_stage_runs_have_params_dataset_inputs_and_exactly_once_metrics(retrained: dict, mlflow) -> None:
    builds = {b["name"]: b["build_id"] for b in retrained["builds"]}
    stage_runs = [
        r for r in _children(mlflow, retrained["parent_run_id"]) if r.data.tags.get("mvlm.kind") == "stage"
    ]
    assert {r.data.tags["mvlm.stage"] for r in stage_runs} == {"llm-pretrain", "vlm-align", "vlm-instruct"}
    for run in stage_runs:
        assert run.info.status == "FINISHED"
        assert (
            run.data.params["stage.name"] == run.data.tags["mvlm.stage"]
            and "stage.optim.lr" in run.data.params
        )
        inputs = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
        assert inputs and all(builds[name] == digest for name, digest in inputs.items())
        history = mlflow.get_metric_history(run.info.run_id, "loss")
        assert sorted(m.step for m in history) == list(range(1, len(history) + 1))


# --- issue 6: lineage ------------------------------------------------------------------------------


def test_retrain_run_has_a_child_for_every_step(retrained: dict, mlflow) -> None:
    kinds = sorted(r.data.tags.get("mvlm.kind", "") for r in _children(mlflow, retrained["parent_run_id"]))
    assert kinds.count("build") == 4 and kinds.count("stage") == 3 and kinds.count("evaluation") == 2
    assert kinds.count("export") == 1 and kinds.count("quant") == 2
    for quant in retrained["quants"]:  # device results are children of their quant run
        benches = _children(mlflow, quant["run_id"])
        assert len(benches) == 1 and benches[0].data.tags["mvlm.model_version"] == quant["model_version"]
    build_run = next(
        r for r in _children(mlflow, retrained["parent_run_id"]) if r.data.tags.get("mvlm.kind") == "build"
    )
    (dataset,) = build_run.inputs.dataset_inputs
    assert (
        dataset.dataset.source.endswith("/shards")
        and dataset.dataset.digest in build_run.data.tags["mvlm.identity"]
    )


def test_registered_models_chain_with_their_tags(retrained: dict, mlflow) -> None:
    import json

    assert retrained["models"] == [
        "tiny-mobilellama-base@1",
        "tiny-mobilevlm-aligned@1",
        "tiny-mobilevlm-instruct@1",
    ]
    parents = {}
    for ref in [*retrained["models"], *(q["model_version"] for q in retrained["quants"])]:
        name, version = ref.split("@")
        (v,) = [v for v in mlflow.search_model_versions(f"name='{name}'") if str(v.version) == version]
        parents[ref] = v.tags["mvlm.parent_model"]
        assert mlflow.get_run(v.tags["mvlm.run_id"]).info.status == "FINISHED"
        assert v.run_id == v.tags["mvlm.run_id"]  # the run holding its files, as an MLflow server requires
        assert v.tags["mvlm.retrain_run_id"] == retrained["parent_run_id"]
        assert json.loads(v.tags["mvlm.datasets"])
    assert parents["tiny-mobilevlm-aligned@1"] == "tiny-mobilellama-base@1"
    assert parents["tiny-mobilevlm-instruct@1"] == "tiny-mobilevlm-aligned@1"
    assert parents["tiny-gguf-q8_0@1"] == "tiny-mobilevlm-instruct@1"


def test_lineage_command_prints_upstream_and_downstream(retrained: dict) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    out = CliRunner().invoke(app, ["lineage", "tiny-gguf-q8_0"], env={"COLUMNS": "250"})
    assert out.exit_code == 0, out.output
    for expected in (
        "tiny-mobilevlm-instruct@1",
        "tiny-mobilellama-base@1",
        "dataset tiny-redpajama",
        "dataset tiny-cc3m",
        "spec=",
        "recipe=tiny",
        "stage=vlm-align",
        "code=",
        "device result host-cpu",
    ):
        assert expected in out.output, expected
    assert Path(retrained["device_chart"]).stat().st_size > 1000
    html = Path(retrained["lineage"]).read_text()
    assert "tiny-mobilellama-base@1" in html and "device result" in html
    missing = CliRunner().invoke(app, ["lineage", "no-such-model"])
    assert missing.exit_code == 1 and "no registered model 'no-such-model'" in missing.output


def test_second_retrain_reuses_everything_in_seconds(retrained: dict) -> None:
    from flows.retrain import retrain

    start = time.perf_counter()
    again = retrain("tiny")
    assert time.perf_counter() - start < 90
    assert again["parent_run_id"] == retrained["parent_run_id"]
    assert all(b["reused"] for b in again["builds"]) and all(s["reused"] for s in again["stages"])
    assert [b["status"] for b in again["benchmarks"]] == ["reused", "reused"]
    assert again["models"] == retrained["models"]


def test_until_stops_after_the_named_step_and_a_full_run_clears_the_mark(retrained: dict, mlflow) -> None:
    from flows.retrain import retrain

    stopped = retrain("tiny", until="export")
    assert stopped["stopped_after"] == "export" and stopped["export"] == retrained["export"]
    assert stopped["models"] == retrained["models"]
    assert stopped["quants"] == [] and stopped["benchmarks"] == []
    assert mlflow.get_run(retrained["parent_run_id"]).data.tags[tag.STOPPED_AFTER] == "export"
    full = retrain("tiny")
    assert full["stopped_after"] is None and [q["model_version"] for q in full["quants"]] == [
        q["model_version"] for q in retrained["quants"]
    ]
    run = mlflow.get_run(retrained["parent_run_id"])
    assert tag.STOPPED_AFTER not in run.data.tags and run.info.status == "FINISHED"


def test_train_flow_reuses_the_finished_stages(retrained: dict) -> None:
    from flows.train import train

    again = train("tiny")
    assert [s["stage_id"] for s in again] == [s["stage_id"] for s in retrained["stages"]]
    assert all(s["reused"] for s in again)


def test_a_failing_step_is_named_and_finished_steps_are_kept(retrained: dict) -> None:
    from flows.retrain import RetrainError, retrain

    with pytest.raises(RetrainError, match=r"retrain step 'quantize:q9_9' failed: .*rerun to continue"):
        retrain("tiny", quant_types=["q9_9"])
    for s in retrained["stages"]:
        assert (Path(s["final"]) / "model.safetensors").is_file()


# --- the MLflow UI, as a user sees it ----------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_ui(retrained: dict, env: Path):
    """A real ``mlflow server`` on 127.0.0.1 over the retrain's SQLite store."""
    import subprocess
    import sys
    import urllib.request

    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{env / 'mlflow.db'}",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError("mlflow server did not start")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _page_text(url: str, tmp_path: Path) -> str:
    """The page's text after its JavaScript ran, from headless Chromium."""
    import re
    import shutil
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "headless Chromium is required (.ci/run installs Debian's chromium)"
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium'}",
        "--virtual-time-budget=30000",
        "--dump-dom",
    ]
    dom = subprocess.run([browser, *flags, url], capture_output=True, text=True, timeout=120).stdout
    text = re.sub(r"<[^>]+>", " ", re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", dom, flags=re.S))
    return re.sub(r"\s+", " ", text)


def test_mlflow_ui_shows_the_retrain_with_children_datasets_and_models(
    retrained: dict, mlflow, mlflow_ui: str, tmp_path: Path
) -> None:
    from tasks.lineage import tracking

    exp = tracking.experiment_id(mlflow, tracking.EXPERIMENT)
    text = _page_text(f"{mlflow_ui}/#/experiments/{exp}/runs/{retrained['parent_run_id']}", tmp_path)
    assert "retrain tiny" in text
    details = text.split("About this run", 1)[1]  # the run page's panel (the sidebar also says "Datasets")
    # Newest first, ten a page: the evaluation runs (one per model x benchmark) come first.
    child_runs = details.split("Child runs", 1)[1].split("Source", 1)[0]
    assert "eval tiny-gqa llama.cpp/q4_0" in child_runs and "Load more" in child_runs, child_runs
    # The panel shows the first dataset and model by name and folds the rest into "+N".
    datasets = details.split("Datasets", 1)[1].split("Tags", 1)[0]
    specs = {b["name"] for b in retrained["builds"]}
    assert any(name in datasets for name in specs) and f"+{len(specs) - 1}" in datasets, datasets
    # Each model version links to the child run that holds its files (an MLflow server requires it).
    name, version = retrained["models"][-1].split("@")
    stage_run = mlflow.get_model_version(name, version).run_id
    text = _page_text(f"{mlflow_ui}/#/experiments/{exp}/runs/{stage_run}", tmp_path)
    models = text.split("About this run", 1)[1].split("Registered models", 1)[1][:300]
    assert retrained["models"][-1].split("@")[0] in models, models
    # The scorecard is an artifact of the retrain run; the model page shows the gate's aliases.
    parent = retrained["parent_run_id"]
    text = _page_text(f"{mlflow_ui}/#/experiments/{exp}/runs/{parent}/artifacts", tmp_path)
    assert re.search(r"Artifacts lineage plots scorecard", text), text[-2000:]
    text = _page_text(f"{mlflow_ui}/#/models/{name}", tmp_path).replace("&nbsp;", " ")
    assert f"mvlm.retrain_run_id : {parent}" in text and "@ champion" in text, text[-2000:]


# --- README claims: --force / --from / --stage (last: they retrain a stage of the shared run) ---------


def _stage_rows(output: str) -> dict[str, str]:
    """stage -> status column of the retrain summary table."""
    names = ("llm-pretrain", "vlm-align", "vlm-instruct")
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.replace("┃", "│").split("│") if c.strip()]
        if len(cells) > 1 and cells[0] in names and cells[1] in ("reused", "trained"):
            rows[cells[0]] = cells[1]
    return rows


def test_force_retrains_the_named_stage_only_and_bad_stage_names_are_refused(retrained: dict, mlflow) -> None:
    """`mvlm retrain tiny --force vlm-align` retrains that stage alone. Training is deterministic, so the
    retrained stage gets the same weights and the stage after it (whose identity hashes its init
    weights) stays reused; the registered models do not change. `--from`/`--force` with a name that is
    not a stage are refused before anything runs (which stages `--from` selects: test_recipes)."""
    from typer.testing import CliRunner

    from flows.cli import app

    before = {s["stage"]: s for s in retrained["stages"]}
    weights = Path(before["vlm-align"]["final"]) / "model.safetensors"
    old_bytes = weights.read_bytes()
    forced = CliRunner().invoke(
        app, ["retrain", "tiny", "--force", "vlm-align", "--until", "train"], env={"COLUMNS": "250"}
    )
    assert forced.exit_code == 0, forced.output
    assert _stage_rows(forced.output) == {
        "llm-pretrain": "reused", "vlm-align": "trained", "vlm-instruct": "reused"
    }, forced.output  # fmt: skip
    assert weights.read_bytes() == old_bytes  # retrained, same bits
    assert f"{before['vlm-align']['first_loss']:.3f}" in forced.output
    for flag in ("--from", "--force"):
        typo = CliRunner().invoke(app, ["retrain", "tiny", flag, "vlm_align"])
        assert typo.exit_code == 1, typo.output
        assert f"{flag} 'vlm_align': recipe tiny has no enabled stage" in typo.output
    full = CliRunner().invoke(app, ["retrain", "tiny"], env={"COLUMNS": "250"})  # clears the until mark
    assert full.exit_code == 0, full.output
    assert set(_stage_rows(full.output).values()) == {"reused"}
    versions = [int(v.version) for v in mlflow.search_model_versions("name='tiny-mobilevlm-instruct'")]
    assert versions == [1]


def test_train_stage_runs_one_stage_after_finished_predecessors(
    retrained: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`mvlm train tiny --stage vlm-instruct` runs that stage alone; in a runs root where its
    predecessors never ran it refuses, naming the first missing one and the command that trains it."""
    from typer.testing import CliRunner

    from flows.cli import app

    one = CliRunner().invoke(app, ["train", "tiny", "--stage", "vlm-instruct"], env={"COLUMNS": "250"})
    assert one.exit_code == 0, one.output
    instruct = next(s for s in retrained["stages"] if s["stage"] == "vlm-instruct")
    table = one.output[one.output.index("recipe tiny") :]
    assert instruct["stage_id"] in table and "vlm-instruct" in table
    assert not any(s["stage_id"] in table for s in retrained["stages"] if s is not instruct)
    monkeypatch.setenv("MVLM_RUNS_ROOT", str(tmp_path / "runs"))
    missing = CliRunner().invoke(app, ["train", "tiny", "--stage", "vlm-instruct"], env={"COLUMNS": "250"})
    assert missing.exit_code == 1, missing.output
    assert "stage llm-pretrain must finish before vlm-instruct" in missing.output
    assert "mvlm train tiny --stage llm-pretrain" in missing.output
    assert not (tmp_path / "runs" / "tiny" / "vlm-instruct").exists()
