"""The tiny retrain's verdict: the six benchmark replicas asked of the PyTorch model and both
quantizations, child runs in MLflow, the gate and its aliases, the scorecard, and a worse retrain
that does not move ``champion``. Runs after ``test_pipeline`` (same session retrain)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tasks.lineage import tags as tag
from tasks.lineage import tracking

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local", "prefect_api")]
SETS = ("tiny-gqa", "tiny-sqa", "tiny-textvqa", "tiny-pope", "tiny-mme", "tiny-mmbench")


def _scores(entry: dict) -> dict[str, float]:
    return {run["eval_set"]: run["score"] for run in entry["runs"]}


def test_the_final_model_and_both_quantizations_answer_all_six_sets(retrained: dict) -> None:
    models = [e["model"] for e in retrained["evaluations"]]
    assert models == ["pytorch", "q8_0", "q4_0"]
    for entry in retrained["evaluations"]:
        assert [run["eval_set"] for run in entry["runs"]] == list(SETS)
        assert all(run["questions"] > 0 and run["questions_per_s"] > 0 for run in entry["runs"])
    pytorch = _scores(retrained["evaluations"][0])
    # GQA-style: chance is 25.2% (a uniform answer of the question's type), answering each type's most
    # common answer 33.9% (test_eval_sets computes both from the replica).
    assert pytorch["tiny-gqa"] >= 1.7 * 25.2 and pytorch["tiny-gqa"] > 33.9, pytorch
    for run in retrained["evaluations"][1]["runs"]:  # q8_0 scores the questions as PyTorch does
        assert run["vs_pytorch"]["same_verdict"] >= 0.8, run
        # and gives PyTorch's very answer almost always where PyTorch has learned the set at all; where it
        # scores nothing (ScienceQA's letters: the tiny world never asks for one) its answers are near ties
        if pytorch[run["eval_set"]] > 0:
            assert run["vs_pytorch"]["same_answer"] >= 0.8, run
    q8 = _scores(retrained["evaluations"][1])
    assert all(abs(q8[s] - pytorch[s]) <= 10 * (20 if s == "tiny-mme" else 1) for s in SETS), (q8, pytorch)


def test_each_evaluation_is_a_child_run_with_scores_answers_and_its_set(retrained: dict, mlflow) -> None:
    runs = {(r["model_version"], r["eval_set"]): r for r in _evaluation_runs(mlflow, retrained)}
    assert len(runs) == 3 * len(SETS)
    entry = retrained["evaluations"][0]
    first = entry["runs"][0]
    run = mlflow.get_run(first["run_id"])
    assert run.data.tags[tag.KIND] == "benchmark-eval" and run.data.tags[tag.BACKEND] == "pytorch"
    assert run.data.metrics["score"] == pytest.approx(first["score"])
    quant = retrained["evaluations"][1]["runs"][0]
    metrics = mlflow.get_run(quant["run_id"]).data.metrics
    assert metrics["vs_pytorch.same_answer"] == pytest.approx(quant["vs_pytorch"]["same_answer"])
    inputs = [d.dataset for d in run.inputs.dataset_inputs]
    assert [(d.name, d.digest) for d in inputs] == [(first["eval_set"], run.data.params["eval_identity"])]
    files = {a.path for a in mlflow.list_artifacts(first["run_id"], "predictions")}
    assert "predictions/answers.jsonl" in files and "predictions/testdev_balanced_predictions.json" in files


def _evaluation_runs(mlflow, retrained: dict) -> list[dict]:
    from tasks.lineage.quality_runs import evaluation_runs

    return evaluation_runs(mlflow, retrained["parent_run_id"])


def test_the_gate_passes_and_moves_candidate_and_champion(retrained: dict, mlflow) -> None:
    gate = retrained["gate"]
    assert gate["passed"] and gate["failures"] == [] and gate["aliases"] == ["candidate", "champion"]
    for entry in retrained["evaluations"]:
        name, version = entry["model_version"].split("@")
        for alias in ("candidate", "champion"):
            assert str(mlflow.get_model_version_by_alias(name, alias).version) == version
        mv = mlflow.get_model_version(name, version)
        assert float(mv.tags["mvlm.score.tiny-pope"]) == pytest.approx(_scores(entry)["tiny-pope"], abs=1e-3)
        assert mv.description.startswith("recipe tiny, ") and "scores: tiny-gqa " in mv.description
    assert mlflow.get_run(retrained["parent_run_id"]).data.tags[tag.GATE] == "PASS"
    experiment = mlflow.get_experiment(tracking.experiment_id(mlflow))
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_the_scorecard_is_on_the_retrain_run_and_printed_by_mvlm_scorecard(retrained: dict, mlflow) -> None:
    from flows.cli import app

    card = retrained["scorecard"]
    rows = json.loads(Path(card["json"]).read_text())["rows"]
    assert [r["model"] for r in rows[:3]] == ["pytorch", "q8_0", "q4_0"]
    assert rows[1]["size_mb"] > rows[2]["size_mb"] > 0  # q8_0 is bigger than q4_0
    assert {r["model"] for r in rows if r["source"] == "paper"} >= {"MobileVLM-1.7B", "MobileVLM V2 3B"}
    files = {a.path for a in mlflow.list_artifacts(retrained["parent_run_id"], "scorecard")}
    assert {Path(p).suffix for p in files} == {".html", ".json", ".png"}
    result = CliRunner().invoke(app, ["scorecard", retrained["parent_run_id"]])
    assert result.exit_code == 0, result.output
    assert "pytorch" in result.output and "q4_0" in result.output and "MobileVLM-1.7B" in result.output
    by_version = CliRunner().invoke(app, ["scorecard", retrained["models"][-1]])
    assert by_version.exit_code == 0 and by_version.output == result.output
    missing = CliRunner().invoke(app, ["scorecard", "no-such-model@1"])
    assert missing.exit_code == 2 and "no-such-model" in missing.output and "Traceback" not in missing.output


@pytest.mark.mutates_session_retrain
def test_a_worse_retrain_fails_the_gate_and_leaves_the_champion(retrained: dict, mlflow, tmp_path: Path,
                                                                 monkeypatch) -> None:  # fmt: skip
    """The same recipe with almost no instruction steps (a file of the same name shadows ours)."""
    from flows.cli import app

    text = (Path(__file__).parents[1] / "recipes" / "tiny.yaml").read_text()
    head, instruct = text.split("- name: vlm-instruct\n")
    (tmp_path / "tiny.yaml").write_text(f"{head}- name: vlm-instruct\n  max_steps: 2\n{instruct}")
    monkeypatch.setenv("MVLM_RECIPE_DIR", str(tmp_path))
    result = CliRunner().invoke(app, ["retrain", "tiny", "--require-gate", "--quant", "q8_0"])
    assert result.exit_code == 3, result.output
    assert "gate FAIL: tiny-gqa:" in " ".join(result.output.split())
    name, version = retrained["models"][-1].split("@")
    assert str(mlflow.get_model_version_by_alias(name, "champion").version) == version
    candidate = mlflow.get_model_version_by_alias(name, "candidate").version
    assert int(candidate) > int(version)
    weak = mlflow.search_runs([tracking.experiment_id(mlflow)],
                              filter_string=f"{tag.search(tag.GATE, 'FAIL')}")  # fmt: skip
    assert len(weak) == 1 and json.loads(weak[0].data.tags[tag.GATE_FAILURES])
