"""``mvlm retrain RECIPE`` and ``mvlm lineage MODEL[@VERSION]``."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import typer
from rich.table import Table

from flows.logs import console, log_file, report_failure


def register(app: typer.Typer) -> None:
    """Attach the retrain and lineage commands to the root app."""
    app.command("retrain")(retrain)
    app.command("lineage")(lineage)


def retrain(
    recipe: Annotated[str, typer.Argument(help="Recipe name, see `mvlm recipes`.")],
    from_stage: Annotated[
        str | None, typer.Option("--from", help="Retrain this stage and all later ones.")
    ] = None,
    force: Annotated[
        list[str] | None, typer.Option(help="Retrain this stage even if unchanged (repeatable).")
    ] = None,
    pool: Annotated[
        list[str] | None, typer.Option(help="Device work pool to benchmark on (repeatable).")
    ] = None,
    quant: Annotated[list[str] | None, typer.Option(help="llama.cpp quant type (repeatable).")] = None,
    bench_timeout: Annotated[float, typer.Option(help="Seconds to wait for each device benchmark.")] = 600,
    until: Annotated[
        Literal["data", "train", "export", "quantize", "evaluate", "benchmark"] | None,
        typer.Option(help="Stop after this step (default: run everything); a rerun continues from there."),
    ] = None,
    require_gate: Annotated[
        bool,
        typer.Option(help="Exit 3 when the gate fails (a failed gate is otherwise reported, not an error)."),
    ] = False,
    init: Annotated[
        list[str] | None,
        typer.Option(
            help="STAGE=PATH_OR_HUB_ID: start that stage from a checkpoint, e.g. "
            "vlm-align=mtgv/MobileLLaMA-1.4B-Chat (repeatable; recorded in lineage)."
        ),
    ] = None,
) -> None:
    """Data, training stages, evaluation, export, quantization and device benchmarks, reusing what exists."""
    from flows.retrain import RetrainError
    from flows.retrain import retrain as retrain_flow
    from tasks.train.init_source import parse_inits
    from tasks.train.recipes import get_recipe

    try:
        inits = parse_inits(init or [], get_recipe(recipe))
        result = retrain_flow(recipe, from_stage, force, pool, quant, bench_timeout, until=until, inits=inits)
    except (RetrainError, KeyError, ValueError) as err:
        report_failure(err)
        raise typer.Exit(1) from err
    print_summary(result)
    if require_gate and result.get("gate") and not result["gate"]["passed"]:
        raise typer.Exit(3)


def print_summary(result: dict[str, Any]) -> None:
    """Tables of what the retrain produced, and how to open MLflow on it."""
    from tasks.core.settings import get_settings

    data = Table("dataset", "build", "status", "kept", "rejected", title="data")
    for b in result["builds"]:
        t = b["totals"]
        data.add_row(b["name"], b["build_id"], "reused" if b["reused"] else "built", str(t.get("kept", 0)),
                     str(t.get("rejected", 0)))  # fmt: skip
    stages = Table("stage", "status", "first loss", "final loss", "evaluation", "model", title="stages")
    for s, model in zip(result["stages"], result["models"], strict=True):
        evaluation = ", ".join(f"{k} {v:.3f}" for k, v in (s.get("evaluation") or {}).items())
        status = "reused" if s.get("reused") else "trained"
        stages.add_row(
            s["stage"], status, f"{s['first_loss']:.3f}", f"{s['final_loss']:.3f}", evaluation or "-", model
        )
    quants = Table(
        "quant", "size MB", "model", "pool", "status", "LM eval tok/s", "VLM eval tok/s", title="deploy"
    )
    for q in result["quants"]:
        for b in (b for b in result["benchmarks"] if b["quant_type"] == q["quant_type"]):
            m = b.get("metrics") or {}
            size = f"{q['bytes'] / 1e6:.1f}"
            speeds = _num(m.get("lm.eval_tps")), _num(m.get("vlm.eval_tps"))
            quants.add_row(q["quant_type"], size, q["model_version"], b["pool"], b["status"], *speeds)
    for table in (data, stages, quants):
        console.print(table)
    if result.get("evaluations"):
        console.print(_scorecard(result))
        console.print(_agreement(result["evaluations"]), highlight=False)
    if result.get("lineage"):
        console.print(f"lineage: {result['lineage']}")
    if result.get("stopped_after"):
        step = result["stopped_after"]
        console.print(
            f"stopped after step [bold]{step}[/bold] (--until {step}); run again without --until to continue",
            highlight=False,
        )
    uri = get_settings().mlflow_uri
    console.print(
        f"open MLflow on this store: [bold]mlflow ui --backend-store-uri {uri}[/bold]", highlight=False
    )
    if log_file() is not None:
        console.print(f"full log (library and Ray output): {log_file()}", highlight=False)


def _scorecard(result: dict[str, Any]) -> Table:
    """The scorecard (ours, the champion before this retrain, the papers') with the gate's verdict."""
    from flows.cli_eval import scorecard_table
    from flows.quality import scorecard_rows

    return scorecard_table(scorecard_rows(result), "scorecard", result.get("gate") or {})


def _agreement(evaluations: list[dict[str, Any]]) -> str:
    """One line: how often each quantization gives the PyTorch model's answer."""
    parts = []
    for entry in evaluations[1:]:
        shares = [run["vs_pytorch"]["same_answer"] for run in entry["runs"] if "vs_pytorch" in run]
        if shares:
            parts.append(f"{entry['model']} {100 * sum(shares) / len(shares):.1f}%")
    return "same answer as PyTorch (mean over sets): " + ", ".join(parts) if parts else ""


def _num(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, int | float) else "-"


def lineage(
    model: Annotated[str, typer.Argument(help="Registered model name, optionally @VERSION.")],
) -> None:
    """Print what made a model version (datasets, stages, recipe, code) and what was made from it."""
    from tasks.lineage import tracking
    from tasks.lineage.graph import downstream, render_text, upstream

    mlflow = tracking.client()
    try:
        up, down = upstream(mlflow, model), downstream(mlflow, model)
    except KeyError as err:
        console.print(f"[red]error:[/red] {err.args[0]}", highlight=False)
        raise typer.Exit(1) from err
    console.print("[bold]upstream[/bold] (what made it)")
    console.print(render_text(up))
    console.print("[bold]downstream[/bold] (what was made from it)")
    console.print(render_text(down))
