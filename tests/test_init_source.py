"""Starting a stage from a checkpoint folder or a hub model (``mvlm retrain --init STAGE=...``): the
folder or the pinned download is what the stage plan starts from, its weights are in the stage
identity, the start point is on the stage's MLflow run, and bad values get our message."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fake_hub import serve_hub
from typer.testing import CliRunner

from tasks.train.init_source import InitError, parse_inits, resolve_init
from tasks.train.recipes import get_recipe

SHA = "0123456789abcdef0123456789abcdef01234567"


def _publish(hub: Path, repo: str, checkpoint: Path) -> None:
    """``checkpoint``'s files as commit SHA of model repo ``repo`` on the fake hub (plus a file the
    download must leave out)."""
    folder = hub / repo / SHA
    shutil.copytree(checkpoint, folder)
    (folder / "optimizer.pt").write_bytes(b"not needed")
    (hub / repo / "refs.json").write_text(json.dumps({"main": SHA}))


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    import model as mvlm

    return mvlm.save(mvlm.build("tiny-llama", vocab_size=64), tmp_path / "released")


def test_a_folder_is_used_as_it_is_and_bad_values_are_named(checkpoint: Path, tmp_path: Path) -> None:
    assert resolve_init(str(checkpoint), tmp_path) == str(checkpoint.resolve())
    with pytest.raises(InitError, match="neither a checkpoint folder nor a hub model id"):
        resolve_init("./no/such/folder", tmp_path)
    recipe = get_recipe("tiny")
    assert parse_inits(["vlm-align=owner/model@v1"], recipe) == {"vlm-align": "owner/model@v1"}
    with pytest.raises(InitError, match="expected STAGE=PATH_OR_HUB_ID"):
        parse_inits(["owner/model"], recipe)
    with pytest.raises(InitError, match=r"no enabled stage 'llm-sft'; stages: \['llm-pretrain'"):
        parse_inits(["llm-sft=owner/model"], recipe)


def test_a_hub_model_is_fetched_once_at_its_commit(checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    hub = tmp_path / "hub"
    _publish(hub, "mtgv/Tiny-Chat", checkpoint)
    with serve_hub(hub) as (endpoint, requests):
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        folder = Path(resolve_init("mtgv/Tiny-Chat", tmp_path / "runs"))
        assert SHA in str(folder) and str(folder).startswith(str(tmp_path / "runs" / "hub"))
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            p.name for p in checkpoint.iterdir()
        )  # not optimizer.pt
        assert (folder / "model.safetensors").read_bytes() == (checkpoint / "model.safetensors").read_bytes()
        downloads = [r for r in requests if "/resolve/" in r]
        assert Path(resolve_init(f"mtgv/Tiny-Chat@{SHA}", tmp_path / "runs")) == folder
        assert [r for r in requests if "/resolve/" in r] == downloads  # the second call downloads nothing
        with pytest.raises(InitError, match="cannot fetch model mtgv/Missing from the hub"):
            resolve_init("mtgv/Missing", tmp_path / "runs")


def test_retrain_refuses_a_bad_init_before_doing_anything() -> None:
    from flows.cli import app

    result = CliRunner().invoke(app, ["retrain", "tiny", "--init", "vlm-sft=x/y"])
    assert result.exit_code == 1
    assert "has no enabled stage 'vlm-sft'" in " ".join(result.output.split())


@pytest.mark.slow
@pytest.mark.mutates_session_retrain
def test_a_stage_planned_from_a_hub_model_records_it(
    retrained: dict, env: Path, tmp_path: Path, monkeypatch
) -> None:
    """vlm-instruct of the session's tiny retrain, started from its own aligned model published on
    the fake hub: same weights as the retrain's start point, so the same checkpoint is checked; the
    start point joins the identity and the MLflow run."""
    from prefect import flow

    from flows.train import plan_stage_task, stage_init
    from tasks.lineage import tags as tag
    from tasks.lineage import tracking

    aligned = next(s["final"] for s in retrained["stages"] if s["stage"] == "vlm-align")
    _publish(tmp_path / "hub", "mtgv/Tiny-Aligned", Path(aligned))
    inits = {"vlm-instruct": "mtgv/Tiny-Aligned"}
    recipe = get_recipe("tiny", **{s: {"init": v} for s, v in inits.items()})
    stage = recipe.stage("vlm-instruct")
    data_root, runs_root = str(env / "data"), str(env / "runs")

    @flow(name="plan-from-hub")
    def plan() -> object:
        return plan_stage_task(recipe, stage, stage_init(stage, None, runs_root), data_root, runs_root)

    with serve_hub(tmp_path / "hub") as (endpoint, _):
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        planned = plan()
    ours = next(s for s in retrained["stages"] if s["stage"] == "vlm-instruct")
    assert planned.init["named"] == "mtgv/Tiny-Aligned" and SHA in planned.init["path"]
    assert planned.stage_id != ours["stage_id"]  # the start point is part of what the stage is
    run = tracking.client().get_run(planned.mlflow_run_id)
    assert run.data.tags[tag.INIT] == "mtgv/Tiny-Aligned"
    assert run.data.tags[tag.INIT_PATH] == planned.init["path"]
