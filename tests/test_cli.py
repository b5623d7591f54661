"""The mvlm CLI: model list / info / smoke."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from flows.cli import app
from model.config import config_names

runner = CliRunner()


def test_model_info_json_has_the_published_numbers() -> None:
    result = runner.invoke(app, ["model", "info", "mobilevlm-1.7b", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["name"] == "mobilevlm-1.7b"
    assert data["params"] == {
        "llm": 1_364_297_728,
        "vision": 303_507_456,
        "projector": 18_936_832,
        "total": 1_686_742_016,
    }
    assert data["visual_tokens"] == 144
    assert (
        data["llm"]["n_layer"] == 24 and data["llm"]["hidden"] == 2048 and data["llm"]["vocab_size"] == 32000
    )


def test_model_list_shows_every_row() -> None:
    result = runner.invoke(app, ["model", "list"])
    assert result.exit_code == 0
    for name in config_names():
        assert name in result.output


def test_unknown_model_exits_2_naming_known_ones() -> None:
    result = runner.invoke(app, ["model", "info", "llava-13b"])
    assert result.exit_code == 2
    assert "unknown model config 'llava-13b'" in result.output and "mobilevlm-tiny" in result.output


def test_model_smoke_trains_and_generates() -> None:
    from tasks.testkit.smoke import run_smoke

    result = run_smoke(steps=4)
    assert result.trainable < result.params  # the vision tower stays frozen
    assert len(result.losses) == 4 and result.losses[-1] < result.losses[0]
    assert isinstance(result.generated, str) and result.generated.strip()  # 8 greedy tokens, decoded
    again = run_smoke(steps=4)  # same seed: the same losses and the same answer, to the letter
    assert again.losses == result.losses and again.generated == result.generated
    cli = runner.invoke(app, ["model", "smoke", "--steps", "1"])
    assert cli.exit_code == 0, cli.output
    assert "params.total" in cli.output and "generated" in cli.output


def test_build_table_says_when_a_build_was_repaired() -> None:
    from flows.cli_data import _status

    assert _status({"reused": True, "repaired": []}) == "reused"
    assert _status({"reused": False}) == "built"
    two = [{"shard": "a.tar"}, {"shard": "b.tar"}]
    assert _status({"reused": False, "repaired": two}) == "repaired (2 shards)"
