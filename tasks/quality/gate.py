"""The gate: whether a retrain's models may replace the champion, and which threshold failed.

Scores are per evaluation set (headline figures); drops compare points, MME's perception counted as
score / 20 as the papers' average does, so one threshold reads the same on every set.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tasks.quality.scoring import average

Scores = Mapping[str, float]
"""Evaluation set name -> headline score."""


@dataclass
class GateResult:
    """The verdict of a gate on one retrain."""

    passed: bool
    """Every threshold held."""
    failures: list[str] = field(default_factory=list)
    """One sentence per threshold that failed: which set, which model, the numbers."""
    checks: int = 0
    """How many comparisons were made."""


def points(benchmark: str, headline: float) -> float:
    """A headline in percentage points (MME perception / 20)."""
    return headline / 20 if benchmark == "mme" else headline


def set_average(scores: Scores, benchmarks: Mapping[str, str]) -> float | None:
    """The papers' average over the six benchmarks, when all six are among ``scores``."""
    return average({benchmarks[name]: value for name, value in scores.items()})


def check_gate(
    gate: Any, benchmarks: Mapping[str, str], model: Scores, quants: Mapping[str, Scores],
    champion: Scores | None,
) -> GateResult:  # fmt: skip
    """Apply ``gate`` (a recipe's ``Gate``) to the PyTorch model's scores, each quantization's and
    the champion's (None: there is none yet, so that check passes). ``benchmarks`` maps each set
    name to its benchmark."""
    failures: list[str] = []
    checks = 0
    for name, minimum in gate.min_scores.items():
        checks += 1
        got = set_average(model, benchmarks) if name == "average" else model.get(name)
        if got is None:
            failures.append(f"{name}: no score to compare with the minimum {minimum:g} (not evaluated)")
        elif got < minimum:
            failures.append(f"{name}: {got:.2f} is below the minimum {minimum:g}")
    if gate.max_drop_vs_champion is not None and champion:
        for name, value in model.items():
            if name in champion:
                checks += 1
                drop = points(benchmarks[name], champion[name]) - points(benchmarks[name], value)
                if drop > gate.max_drop_vs_champion:
                    failures.append(f"{name}: {value:.2f} vs the champion's {champion[name]:.2f}, a drop of "
                                    f"{drop:.2f} points > {gate.max_drop_vs_champion:g}")  # fmt: skip
    if gate.max_quant_drop is not None:
        for quant, scores in quants.items():
            for name, value in scores.items():
                if name in model:
                    checks += 1
                    drop = points(benchmarks[name], model[name]) - points(benchmarks[name], value)
                    if drop > gate.max_quant_drop:
                        failures.append(
                            f"{name}: {quant} scores {value:.2f} vs {model[name]:.2f} in PyTorch, "
                            f"a drop of {drop:.2f} points > {gate.max_quant_drop:g}"
                        )
    return GateResult(not failures, failures, checks)
