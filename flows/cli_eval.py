"""``mvlm eval MODEL --tasks ...`` asks a model the benchmarks; ``mvlm eval score TASK PREDICTIONS``
scores any tool's answers file by the same rules."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import Progress
from rich.table import Table

from flows.cli_groups import default_command_group, fail
from flows.logs import console

eval_app = typer.Typer(
    cls=default_command_group("run"),
    no_args_is_help=True,
    help="The papers' six benchmarks: `mvlm eval MODEL --tasks tiny-gqa,tiny-pope` asks a checkpoint or "
    "GGUF; `mvlm eval score TASK ANSWERS` scores an answers file; `mvlm eval list` shows the sets.",
)


def register(app: typer.Typer) -> None:
    """Attach the ``eval`` group and ``scorecard`` to the root app."""
    app.add_typer(eval_app, name="eval")
    app.command("scorecard")(scorecard_command)


def _specs(tasks: str | None, profile: str) -> list[Any]:
    from tasks.quality.eval_specs import EvalSpecError, find_eval_spec, load_eval_specs

    try:
        if tasks:
            return [find_eval_spec(name.strip())[1] for name in tasks.split(",") if name.strip()]
        chosen = [spec for _, spec in load_eval_specs().values() if spec.profile == profile]
    except (EvalSpecError, KeyError) as err:
        raise fail(str(err).strip("'\"")) from err
    if not chosen:
        raise fail(f"no evaluation specs of profile {profile!r}; pass --tasks")
    return chosen


def _headline(run: Any) -> str:
    return f"{run.score.headline:.1f}" + (" / 2000" if run.benchmark == "mme" else "")


def _details(score: Any) -> str:
    keys = [k for k in score.metrics if k.count("/") == 0][:5]
    return ", ".join(f"{k} {score.metrics[k]:.3g}" for k in keys)


@eval_app.command("run")
def run_command(
    model: Annotated[
        Path, typer.Argument(help="A checkpoint folder, or a GGUF from `mvlm export`/`quantize`.")
    ],
    tasks: Annotated[
        str | None, typer.Option(help="Comma-separated eval spec names (default: every set of --profile).")
    ] = None,
    profile: Annotated[str, typer.Option(help="Sets of this profile when --tasks is not given.")] = "tiny",
    template: Annotated[str, typer.Option(help="Conversation template of the instruction stage.")] = "v1",
    threads: Annotated[int, typer.Option(help="llama.cpp threads (GGUF models).")] = 2,
) -> None:
    """Ask MODEL every question of the sets and score the answers by the benchmarks' rules."""
    from tasks.core.settings import get_settings
    from tasks.quality.backends import ModelRefError, resolve_model
    from tasks.quality.eval_files import EvalSetError
    from tasks.quality.harness import EvalRunError, evaluate_model
    from tasks.quality.scoring import average

    specs = _specs(tasks, profile)
    settings = get_settings()
    try:
        ref = resolve_model(model)
        with Progress(console=console, transient=True) as bar:
            ids: dict[str, Any] = {}

            def progress(name: str, done: int, total: int) -> None:
                ids.setdefault(name, bar.add_task(name, total=total))
                bar.update(ids[name], completed=done)

            out = settings.runs_root / "eval"
            runs = evaluate_model(ref, specs, settings.data_root, out, template, threads, progress)
    except (ModelRefError, EvalSetError, EvalRunError) as err:
        raise fail(str(err)) from err
    table = Table("set", "score", "metrics", "questions", "q/s", title=f"{ref.backend} {ref.path}")
    for run in runs:
        table.add_row(
            run.eval_set,
            _headline(run),
            _details(run.score),
            str(run.questions),
            f"{run.questions_per_s:.1f}",
        )
    mean = average({run.benchmark: run.score.headline for run in runs})
    if mean is not None:
        table.add_row(
            "average", f"{mean:.1f}", "the papers' average (MME / 20 with the five percentages)", "", ""
        )
    console.print(table)
    console.print(f"answers and official files under {Path(runs[0].folder).parent}", highlight=False)


@eval_app.command("score")
def score_command(
    task: Annotated[str, typer.Argument(help="Eval spec name (its questions and references).")],
    predictions: Annotated[Path, typer.Argument(help="Answers jsonl: question_id, text (and prompt).")],
) -> None:
    """Score an answers file in the authors' format by TASK's official rules, without a model."""
    from tasks.core.settings import get_settings
    from tasks.quality.eval_files import EvalSetError
    from tasks.quality.eval_sets import read_eval_set
    from tasks.quality.harness import score_file
    from tasks.quality.scoring import AnswersError

    spec = _specs(task, "")[0]
    try:
        scored = score_file(read_eval_set(spec, get_settings().data_root), predictions)
    except (EvalSetError, AnswersError) as err:
        raise fail(str(err)) from err
    table = Table("metric", "value", title=f"{spec.name} ({spec.benchmark}): {predictions}")
    table.add_row("headline", f"{scored.headline:.2f}")
    for name, value in scored.metrics.items():
        table.add_row(name, f"{value:.4g}")
    for name, value in scored.counts.items():
        table.add_row(f"count {name}", str(value))
    console.print(table)


@eval_app.command("list")
def list_command() -> None:
    """The evaluation specs and where their files are expected."""
    from tasks.quality.eval_specs import EvalSpecError, load_eval_specs

    try:
        specs = load_eval_specs()
    except EvalSpecError as err:
        raise fail(str(err)) from err
    table = Table("name", "benchmark", "profile", "license", "questions file")
    for name, (_, spec) in sorted(specs.items()):
        table.add_row(name, spec.benchmark, spec.profile, spec.license, spec.files["questions"])
    console.print(table)


def scorecard_command(
    target: Annotated[
        str | None, typer.Argument(help="Retrain run id, or MODEL@VERSION / MODEL@ALIAS (default: latest).")
    ] = None,
) -> None:
    """Print a retrain's scorecard: its models on the six benchmarks beside the champion and the papers."""
    from tasks.lineage import tracking
    from tasks.lineage.quality_runs import ScorecardNotFound, retrain_run_of, scorecard_data
    from tasks.quality.scorecard import ScorecardRow

    mlflow = tracking.client()
    try:
        run_id = retrain_run_of(mlflow, target)
        with tempfile.TemporaryDirectory() as folder:
            data = scorecard_data(mlflow, run_id, folder)
    except ScorecardNotFound as err:
        raise fail(str(err)) from err
    rows = [ScorecardRow(**row) for row in data["rows"]]
    console.print(scorecard_table(rows, f"scorecard of retrain {run_id}", data.get("gate") or {}))


def scorecard_table(rows: list[Any], title: str, gate: dict[str, Any]) -> Table:
    """The scorecard rows as a table, the gate's verdict as its caption."""
    from flows.quality import verdict
    from tasks.quality.scorecard import table

    header, cells = table(rows)
    out = Table(*header, title=title, caption=verdict(gate) or None)
    for row in cells:
        out.add_row(*row)
    return out
