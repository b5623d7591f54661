"""Training stages on real Ray Train + DeepSpeed (CPU, gloo): resume after a crash, clear input errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from tasks.data.build import build_dataset
from tasks.train.recipes import get_recipe
from tasks.train.stage import plan_stage, run_stage
from tasks.train.stage_plan import StageError

pytestmark = pytest.mark.usefixtures("ray_local")
SPECS = Path(__file__).resolve().parent.parent / "data_specs"


@pytest.fixture(scope="module")
def text_root(samples_root: Path, tmp_path_factory) -> Path:
    """A data root with the tiny-redpajama build."""
    root = tmp_path_factory.mktemp("train_root")
    (root / "samples").symlink_to(samples_root / "samples")
    build_dataset(SPECS / "tiny-redpajama.yaml", root)
    return root


def _pretrain(**overrides):
    base = {"max_steps": 8, "checkpoint_every": 3, "micro_batch": 4, "global_batch": 8, "num_workers": 2}
    recipe = get_recipe("tiny", **{"llm-pretrain": {**base, **overrides}})
    return recipe, recipe.stage("llm-pretrain")


def _losses(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows]


def _mlflow_plan(plan, tmp_path: Path):
    from tasks.lineage import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client(uri)
    run_id, _ = tracking.run_for(client, "test", plan.stage_id, "stage")
    return dataclasses.replace(plan, mlflow_uri=uri, mlflow_run_id=run_id), client


@pytest.mark.slow
def test_killed_stage_resumes_on_the_same_loss_curve(text_root: Path, tmp_path: Path) -> None:
    recipe, stage = _pretrain()
    scratch = {"kind": "scratch", "path": ""}
    plain, _ = plan_stage(recipe, stage, scratch, text_root, tmp_path / "uninterrupted")
    reference = run_stage(plain)
    assert reference["steps"] == 8

    plan, _ = plan_stage(recipe, stage, scratch, text_root, tmp_path / "killed")
    plan, client = _mlflow_plan(plan, tmp_path)
    assert plan.stage_id == plain.stage_id  # same inputs, same identity
    with pytest.raises(StageError, match="failed"):
        run_stage(dataclasses.replace(plan, kill_at_step=5))  # workers die abruptly after step 5
    assert [s for s, _ in _losses(plan.out)] == [1, 2, 3]  # metrics only up to the last checkpoint
    resumed = run_stage(plan)

    got, want = _losses(plan.out), _losses(plain.out)
    assert [s for s, _ in got] == list(range(1, 9))  # every step exactly once
    for (step, loss), (_, expected) in zip(got, want, strict=True):
        assert loss == pytest.approx(expected, abs=1e-5), f"step {step}"
    assert resumed["final_loss"] == pytest.approx(reference["final_loss"], abs=1e-5)
    history = client.get_metric_history(plan.mlflow_run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 9))
    keys = set(client.get_run(plan.mlflow_run_id).data.metrics)
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "data_wait_fraction"} <= keys
    assert run_stage(plan)["final_sha256"] == resumed["final_sha256"]  # finished: reused, not retrained


def test_missing_build_is_named_before_any_worker_starts(samples_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "empty"
    root.mkdir()
    (root / "samples").symlink_to(samples_root / "samples")
    recipe, stage = _pretrain()
    with pytest.raises(
        StageError, match=r"has no finished build .* run `mvlm data build tiny-redpajama` first"
    ):
        plan_stage(recipe, stage, {"kind": "scratch", "path": ""}, root, tmp_path / "runs")


def test_tokenizer_mismatch_is_refused(text_root: Path, tmp_path: Path) -> None:
    from model.tokenizer import train_tokenizer

    other = tmp_path / "other_tok"
    train_tokenizer(["completely different words here"] * 50, vocab_size=300, out_dir=other)
    recipe, stage = _pretrain()
    with pytest.raises(StageError, match=r"were tokenized with tokenizer .* but the model.s tokenizer is"):
        plan_stage(recipe, stage, {"kind": "scratch", "path": ""}, text_root, tmp_path / "runs", str(other))


def test_checkpoint_that_does_not_match_the_model_is_refused(text_root: Path, tmp_path: Path) -> None:
    import model

    wrong = tmp_path / "wide"
    model.save(model.build("tiny-llama", hidden=128, vocab_size=1024), wrong)
    recipe, stage = _pretrain()
    with pytest.raises(StageError, match="hidden_size: checkpoint 128 vs model 64"):
        plan_stage(recipe, stage, {"kind": "checkpoint", "path": str(wrong)}, text_root, tmp_path / "runs")


@pytest.mark.slow
def test_nan_loss_stops_the_stage_and_keeps_the_last_good_checkpoint(text_root: Path, tmp_path: Path) -> None:
    recipe, stage = _pretrain(max_steps=8, checkpoint_every=2)
    plan, _ = plan_stage(recipe, stage, {"kind": "scratch", "path": ""}, text_root, tmp_path / "runs")
    with pytest.raises(StageError, match=r"loss is nan at step 5; last good checkpoint kept"):
        run_stage(dataclasses.replace(plan, nan_at_step=5))
    assert (plan.out / "checkpoints" / "latest").read_text().strip() == "step-4"
    assert not (plan.out / "final").exists() and not (plan.out / "stage.json").exists()
