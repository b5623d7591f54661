"""The tiny recipe end to end through the real ``train`` flow: every stage learns, MLflow holds it all.

Real Prefect (test harness), real Ray Train with 2 workers, real DeepSpeed on CPU, real MLflow
(SQLite). The accuracy assertion is the proof that image splicing, label masking and freezing
work together: a bug in any of them leaves the colour and shape answers at chance.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.build import build_dataset

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local", "prefect_api")]
SPECS = Path(__file__).resolve().parent.parent / "data_specs"
TINY = ("tiny-redpajama", "tiny-llava-pretrain", "tiny-cc3m", "tiny-llava-instruct")


@pytest.fixture(scope="module")
def trained(samples_root: Path, tmp_path_factory, monkeypatch_module) -> dict:
    """Build the tiny datasets and run ``mvlm train tiny`` once for the module."""
    from flows.train import train

    work = tmp_path_factory.mktemp("train_flow")
    monkeypatch_module.setenv("MVLM_WORK_DIR", str(work))
    data = work / "data"
    data.mkdir()
    (data / "samples").symlink_to(samples_root / "samples")
    builds = {name: build_dataset(SPECS / f"{name}.yaml", data) for name in TINY}
    summaries = train("tiny", data_root=str(data), runs_root=str(work / "runs"))
    return {"work": work, "builds": builds, "stages": {s["stage"]: s for s in summaries}}


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_every_stage_runs_and_its_loss_falls(trained: dict) -> None:
    stages = trained["stages"]
    assert list(stages) == ["llm-pretrain", "vlm-align", "vlm-instruct"]
    for name, s in stages.items():
        assert s["final_loss"] < 0.7 * s["first_loss"], name
        assert (Path(s["final"]) / "model.safetensors").is_file()


def test_pretraining_perplexity_is_far_below_uniform(trained: dict) -> None:
    ppl = trained["stages"]["llm-pretrain"]["evaluation"]["perplexity"]
    assert ppl < 1024 / 20  # uniform over the 1024-token vocabulary would be 1024


def test_the_tiny_vlm_answers_colour_and_shape_far_above_chance(trained: dict) -> None:
    from tasks.samples import SampleConfig

    metrics = trained["stages"]["vlm-instruct"]["evaluation"]
    chance_colour = 1 / len(SampleConfig().colours)
    chance_shape = 1 / len(SampleConfig().kinds)
    assert metrics["accuracy/colour"] >= 2.5 * chance_colour, metrics
    assert metrics["accuracy/shape"] >= 1.7 * chance_shape, metrics


def test_mlflow_has_each_stage_with_params_datasets_and_metrics(trained: dict) -> None:
    from tasks import tracking
    from tasks.settings import get_settings
    from tasks.tracking import EXPERIMENT

    client = tracking.client(get_settings().mlflow_uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = {r.data.tags.get("mvlm.stage"): r for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get("mvlm.kind") == "stage"}  # fmt: skip
    assert set(runs) == {"llm-pretrain", "vlm-align", "vlm-instruct"}
    builds = trained["builds"]
    for name, run in runs.items():
        assert run.info.status == "FINISHED"
        assert run.data.tags[tracking.IDENTITY_TAG] == trained["stages"][name]["stage_id"]
        assert run.data.params["stage.name"] == name and "stage.optim.lr" in run.data.params
        inputs = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
        assert inputs and all(inputs[spec] == builds[spec].build_id for spec in inputs)
        history = client.get_metric_history(run.info.run_id, "loss")
        assert sorted(m.step for m in history) == list(range(1, len(history) + 1))
    align_inputs = {d.dataset.name for d in runs["vlm-align"].inputs.dataset_inputs}
    assert align_inputs == {"tiny-llava-pretrain", "tiny-cc3m"}


def test_a_second_run_reuses_every_stage(trained: dict) -> None:
    import time

    from flows.train import train

    work = trained["work"]
    start = time.perf_counter()
    again = train("tiny", data_root=str(work / "data"), runs_root=str(work / "runs"))
    assert [s["stage_id"] for s in again] == [s["stage_id"] for s in trained["stages"].values()]
    assert time.perf_counter() - start < 60
