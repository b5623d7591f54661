"""The gate against hand-computed thresholds, the recipe fields that configure it, and the scorecard
rows and pages."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.quality.gate import check_gate
from tasks.quality.scorecard import PUBLISHED, rows_for, table, write_scorecard
from tasks.train.recipe_files import RecipeError, load_recipe
from tasks.train.recipe_schema import Gate

SETS = {"g": "gqa", "p": "pope", "m": "mme"}


def test_minimum_scores_name_the_set_and_the_numbers() -> None:
    gate = Gate(min_scores={"g": 40, "p": 70})
    ok = check_gate(gate, SETS, {"g": 40.0, "p": 88.0, "m": 900}, {}, None)
    assert ok.passed and ok.checks == 2  # a score equal to the minimum passes
    low = check_gate(gate, SETS, {"g": 39.99, "p": 88.0}, {}, None)
    assert not low.passed and low.failures == ["g: 39.99 is below the minimum 40"]
    missing = check_gate(gate, SETS, {"g": 50.0}, {}, None)
    assert missing.failures == ["p: no score to compare with the minimum 70 (not evaluated)"]


def test_the_average_minimum_uses_the_papers_average() -> None:
    six = {
        "gqa": "gqa",
        "sqa": "sqa",
        "textvqa": "textvqa",
        "pope": "pope",
        "mme": "mme",
        "mmbench": "mmbench",
    }
    scores = {"gqa": 56.1, "sqa": 57.3, "textvqa": 41.5, "pope": 84.5, "mme": 1196.2, "mmbench": 53.2}
    assert check_gate(Gate(min_scores={"average": 58.7}), six, scores, {}, None).passed  # 352.41 / 6 = 58.735
    failed = check_gate(Gate(min_scores={"average": 58.8}), six, scores, {}, None)
    assert failed.failures == ["average: 58.74 is below the minimum 58.8"]


def test_drops_against_the_champion_count_mme_as_score_over_20() -> None:
    gate = Gate(max_drop_vs_champion=2.0)
    champion = {"g": 50.0, "m": 1200.0}
    assert check_gate(gate, SETS, {"g": 48.0, "m": 1160.0}, {}, champion).passed  # drops 2.0 and 2.0
    result = check_gate(gate, SETS, {"g": 48.0, "m": 1150.0}, {}, champion)
    assert (
        result.failures == ["m: 1150.00 vs the champion's 1200.00, a drop of 2.50 points > 2"]
        and result.checks == 2
    )
    assert check_gate(gate, SETS, {"g": 1.0}, {}, None).passed  # no champion yet: nothing to compare


def test_each_quantization_may_drop_at_most_the_limit_from_pytorch() -> None:
    gate = Gate(max_quant_drop=5.0)
    model = {"g": 60.0, "p": 80.0}
    quants = {"q8_0": {"g": 59.0, "p": 80.5}, "q4_0": {"g": 54.5, "p": 79.0}}
    result = check_gate(gate, SETS, model, quants, None)
    assert not result.passed and result.checks == 4
    assert result.failures == ["g: q4_0 scores 54.50 vs 60.00 in PyTorch, a drop of 5.50 points > 5"]


def _recipe(tmp_path: Path, gate: str) -> Path:
    text = (Path(__file__).parents[1] / "recipes" / "tiny.yaml").read_text()
    start, end = text.index("eval_sets:"), text.index("stages:")
    path = tmp_path / "tiny.yaml"
    path.write_text(text[:start] + gate + text[end:])
    return path


def test_recipe_eval_sets_and_gate_are_checked_against_the_eval_specs(tmp_path: Path) -> None:
    tiny = load_recipe("tiny")
    assert tiny.eval_sets == ("tiny-gqa", "tiny-sqa", "tiny-textvqa", "tiny-pope", "tiny-mme", "tiny-mmbench")
    assert tiny.gate.min_scores == {"tiny-gqa": 40} and tiny.gate.max_quant_drop == 10.0
    real = load_recipe("mobilevlm-1.7b")
    assert (
        real.eval_sets == ("gqa", "sqa", "textvqa", "pope", "mme", "mmbench")
        and real.gate.min_scores["average"] < 58.7
    )
    assert load_recipe("mobilevlm-3b").eval_sets == real.eval_sets  # from its base, with its own gate
    path = _recipe(tmp_path, "eval_sets: [tiny-gqa, tiny-gqq]\n")
    with pytest.raises(RecipeError, match=r"eval_sets: \['tiny-gqq'\] are not evaluation specs"):
        load_recipe("tiny", {"tiny": path})
    path = _recipe(tmp_path, "eval_sets: [tiny-gqa]\ngate: {min_scores: {tiny-pope: 70}}\n")
    with pytest.raises(
        RecipeError, match=r"gate.min_scores: \['tiny-pope'\] are not in the recipe's eval_sets"
    ):
        load_recipe("tiny", {"tiny": path})
    path = _recipe(tmp_path, "eval_sets: [tiny-gqa]\ngate: {max_drop: 3}\n")
    with pytest.raises(RecipeError, match=r"tiny.yaml:\d+: gate.max_drop"):
        load_recipe("tiny", {"tiny": path})


def test_scorecard_rows_pages_and_the_papers_average(tmp_path: Path) -> None:
    scores = {"gqa": 50, "sqa": 60, "textvqa": 30, "pope": 80, "mme": 1000, "mmbench": 40}
    runs = [{"benchmark": b, "score": s, "eval_set": f"tiny-{b}"} for b, s in scores.items()]
    evaluations = [{"model": "pytorch", "model_version": "m@1", "runs": runs},
                   {"model": "q8_0", "model_version": "g@1", "runs": runs[:2]}]  # fmt: skip
    quants = [{"quant_type": "q8_0", "bytes": 2_500_000}]
    benches = [
        {"quant_type": "q8_0", "pool": "host-cpu", "status": "done", "metrics": {"lm.eval_tps": 123.4}}
    ]
    rows = rows_for(evaluations, quants, benches, {"model_version": "m@0", "scores": {"gqa": 45.0}})
    assert [r.source for r in rows] == ["ours", "ours", "champion", *["paper"] * len(PUBLISHED)]
    assert rows[0].average == pytest.approx((50 + 60 + 30 + 80 + 50 + 40) / 6)
    assert rows[1].average is None and rows[1].size_mb == 2.5 and rows[1].tok_s == {"host-cpu": 123.4}
    assert rows[3].average == pytest.approx(58.735, abs=1e-3)  # MobileVLM-1.7B: the README's 58.7
    header, cells = table(rows)
    assert header[-1] == "tok/s host-cpu" and cells[1][-1] == "123.4" and cells[0][6] == "1000"
    page, png = write_scorecard(rows, tmp_path, "card", "tiny", "gate PASS")
    html = page.read_text()
    assert html.count("<tr class='ours'>") == 2 and "MobileVLM V2 3B" in html and "gate PASS" in html
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
