"""``mvlm train RECIPE`` and ``mvlm recipes``."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from flows.logs import console


def register(app: typer.Typer) -> None:
    """Attach the training commands to the root app."""
    app.command("train")(train)
    app.command("recipes")(recipes)


def train(
    recipe: Annotated[str, typer.Argument(help="Recipe name, see `mvlm recipes`.")],
    stage: Annotated[
        str | None, typer.Option(help="Run only this stage (its predecessors must be finished).")
    ] = None,
) -> None:
    """Train a recipe's stages with DeepSpeed on Ray Train (one Prefect flow run)."""
    from flows.train import train as train_flow
    from tasks.build import BuildError
    from tasks.train_stage import StageError

    try:
        summaries = train_flow(recipe, stage)
    except (KeyError, StageError, BuildError, ValueError) as err:
        console.print(f"[red]error:[/red] {err.args[0] if err.args else err}", highlight=False)
        raise typer.Exit(1) from err
    table = Table("stage", "id", "first loss", "final loss", "evaluation", title=f"recipe {recipe}")
    for s in summaries:
        evaluation = ", ".join(f"{k} {v:.3f}" for k, v in (s.get("evaluation") or {}).items())
        table.add_row(
            s["stage"], s["stage_id"], f"{s['first_loss']:.3f}", f"{s['final_loss']:.3f}", evaluation or "-"
        )
    console.print(table)


def recipes() -> None:
    """List recipes and their stages."""
    from tasks.recipes import RECIPES

    table = Table("recipe", "stage", "model", "datasets", "train", "lr", "global batch", "ZeRO", "enabled")
    for recipe in RECIPES.values():
        for s in recipe.stages:
            datasets = ", ".join(f"{d.spec}x{d.weight:g}" for d in s.datasets)
            table.add_row(recipe.name, s.name, s.model, datasets, "+".join(s.train), f"{s.optim.lr:g}",
                          str(s.global_batch), str(s.zero_stage), "yes" if s.enabled else "no")  # fmt: skip
    console.print(table)
