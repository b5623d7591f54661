"""The scorecard: the PyTorch model and each quantization (size, device tok/s per pool) on the six
benchmarks and their average, beside the current champion and the papers' published rows; as rich
table rows, an HTML page and a PNG."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.core.identity import atomic_write_text
from tasks.quality.scoring import BENCHMARKS, average

COLUMNS = {
    "gqa": "GQA",
    "sqa": "SQA-I",
    "textvqa": "VQA-T",
    "pope": "POPE",
    "mme": "MME-P",
    "mmbench": "MMB-dev",
}
"""Benchmark -> column heading, in the papers' order."""

PUBLISHED: tuple[dict[str, Any], ...] = (
    {"model": "MobileVLM-1.7B", "gqa": 56.1, "sqa": 57.3, "textvqa": 41.5, "pope": 84.5, "mme": 1196.2,
     "mmbench": 53.2},
    {"model": "MobileVLM V2 1.7B", "gqa": 59.3, "sqa": 66.7, "textvqa": 52.1, "pope": 84.3, "mme": 1302.8,
     "mmbench": 57.7},
    {"model": "MobileVLM-3B", "gqa": 59.0, "sqa": 61.2, "textvqa": 47.5, "pope": 84.9, "mme": 1288.9,
     "mmbench": 59.6},
    {"model": "MobileVLM V2 3B", "gqa": 61.1, "sqa": 70.0, "textvqa": 57.5, "pope": 84.7, "mme": 1440.5,
     "mmbench": 63.2},
)  # fmt: skip
"""The papers' rows (the authors' README table; MME is the perception score out of 2000)."""


@dataclass
class ScorecardRow:
    """One model's line on the scorecard."""

    model: str
    """``pytorch``, a quantization type, the champion's version or a published model's name."""
    source: str
    """``ours`` (this retrain), ``champion`` (before this retrain) or ``paper``."""
    scores: dict[str, float]
    """Benchmark -> headline score."""
    model_version: str = ""
    """Registered ``name@version`` (ours and the champion)."""
    size_mb: float | None = None
    """GGUF size (quantizations)."""
    tok_s: dict[str, float] = field(default_factory=dict)
    """Device pool -> generation tokens/s (quantizations benchmarked on a device)."""

    @property
    def average(self) -> float | None:
        """The papers' average (MME / 20 with the five percentages), when all six are scored."""
        return average(self.scores)


def rows_for(
    evaluations: Sequence[Mapping[str, Any]], quants: Sequence[Mapping[str, Any]] = (),
    benchmarks: Sequence[Mapping[str, Any]] = (), champion: Mapping[str, Any] | None = None,
    published: bool = True,
) -> list[ScorecardRow]:  # fmt: skip
    """Scorecard rows from a retrain summary's ``evaluations``, ``quants`` and device ``benchmarks``
    (and the champion's ``{"model_version", "scores"}`` by benchmark, when there was one)."""
    sizes = {q["quant_type"]: q.get("bytes") for q in quants}
    speeds: dict[str, dict[str, float]] = {}
    for bench in benchmarks:
        tps = (bench.get("metrics") or {}).get("lm.eval_tps")
        if bench.get("status") == "done" and tps is not None:
            speeds.setdefault(bench["quant_type"], {})[bench["pool"]] = float(tps)
    rows = []
    for entry in evaluations:
        label = entry["model"]
        scores = {run["benchmark"]: float(run["score"]) for run in entry["runs"]}
        size = sizes.get(label)
        rows.append(ScorecardRow(label, "ours", scores, entry.get("model_version", ""),
                                 size / 1e6 if size else None, speeds.get(label, {})))  # fmt: skip
    if champion and champion.get("scores"):
        rows.append(ScorecardRow("champion", "champion", dict(champion["scores"]), champion["model_version"]))
    if published:
        rows += [ScorecardRow(p["model"], "paper", {b: p[b] for b in BENCHMARKS}) for p in PUBLISHED]
    return rows


def _cell(value: float | None, benchmark: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if benchmark != "mme" else f"{value:.0f}"


def table(rows: Sequence[ScorecardRow]) -> tuple[list[str], list[list[str]]]:
    """(header, cells) of the scorecard, for any renderer."""
    pools = sorted({p for r in rows for p in r.tok_s})
    header = ["model", "source", *COLUMNS.values(), "Avg", "MB", *(f"tok/s {p}" for p in pools)]
    cells = []
    for r in rows:
        size = f"{r.size_mb:.1f}" if r.size_mb else "-"
        speeds = [f"{r.tok_s[p]:.1f}" if p in r.tok_s else "-" for p in pools]
        label = f"{r.model} ({r.model_version})" if r.model_version and r.source != "paper" else r.model
        cells.append([label, r.source, *(_cell(r.scores.get(b), b) for b in COLUMNS), _cell(r.average), size,
                      *speeds])  # fmt: skip
    return header, cells


def render_html(rows: Sequence[ScorecardRow], title: str, verdict: str = "") -> str:
    """A standalone HTML page of the scorecard."""
    header, cells = table(rows)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        f"<tr class='{html.escape(r.source)}'>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
        for r, row in zip(rows, cells, strict=True)
    )
    style = ("body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
             "padding:4px 8px;text-align:right}td:first-child{text-align:left}tr.paper{color:#666}"
             "tr.champion{background:#f4f4ff}")  # fmt: skip
    note = f"<p id='gate'>{html.escape(verdict)}</p>" if verdict else ""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{note}"
            f"<table id='scorecard'><tr>{head}</tr>{body}</table>"
            "<p>Scores: the benchmarks' headline figures (MME-P out of 2000); Avg: the papers' average "
            "(MME-P / 20 with the five percentages).</p></body></html>")  # fmt: skip


def render_png(rows: Sequence[ScorecardRow], path: Path, title: str) -> Path:
    """The scorecard as a PNG table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    header, cells = table(rows)
    fig, ax = plt.subplots(figsize=(max(8.0, 1.0 * len(header)), 0.45 * (len(cells) + 2)))
    ax.axis("off")
    grid = ax.table(cellText=cells, colLabels=header, loc="center", cellLoc="right")
    grid.auto_set_font_size(False)
    grid.set_fontsize(8)
    for (row, _), cell in grid.get_celld().items():
        if row > 0 and rows[row - 1].source == "paper":
            cell.get_text().set_color("#666666")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_scorecard(rows: Sequence[ScorecardRow], folder: Path, stem: str, title: str,
                    verdict: str = "") -> tuple[Path, Path]:  # fmt: skip
    """``<stem>.html`` and ``<stem>.png`` under ``folder``."""
    page = atomic_write_text(folder / f"{stem}.html", render_html(rows, title, verdict))
    return page, render_png(rows, folder / f"{stem}.png", title)
