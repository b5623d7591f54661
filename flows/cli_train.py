"""``mvlm train RECIPE`` and ``mvlm recipes``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from flows.logs import console, report_failure

recipes_app = typer.Typer(help="Training recipes: list them, validate recipe files.")


def register(app: typer.Typer) -> None:
    """Attach the training commands to the root app."""
    app.command("train")(train)
    app.add_typer(recipes_app, name="recipes")


def train(
    recipe: Annotated[str, typer.Argument(help="Recipe name, see `mvlm recipes`.")],
    stage: Annotated[
        str | None, typer.Option(help="Run only this stage (its predecessors must be finished).")
    ] = None,
) -> None:
    """Train a recipe's stages with DeepSpeed on Ray Train (one Prefect flow run)."""
    from flows.train import train as train_flow
    from tasks.data.build import BuildError
    from tasks.train.stage_plan import StageError

    try:
        summaries = train_flow(recipe, stage)
    except (KeyError, StageError, BuildError, ValueError) as err:
        report_failure(err)
        raise typer.Exit(1) from err
    table = Table("stage", "id", "first loss", "final loss", "evaluation", title=f"recipe {recipe}")
    for s in summaries:
        evaluation = ", ".join(f"{k} {v:.3f}" for k, v in (s.get("evaluation") or {}).items())
        table.add_row(
            s["stage"], s["stage_id"], f"{s['first_loss']:.3f}", f"{s['final_loss']:.3f}", evaluation or "-"
        )
    console.print(table)


@recipes_app.callback(invoke_without_command=True)
def recipes(ctx: typer.Context) -> None:
    """List recipes and their stages (``recipes/*.yaml``, and ``MVLM_RECIPE_DIR``'s folders first)."""
    if ctx.invoked_subcommand is not None:
        return
    from tasks.train.recipes import RecipeError, load_recipes

    try:
        found = load_recipes()
    except RecipeError as err:
        _print_problems(err.problems)
        raise typer.Exit(1) from err
    table = Table("recipe", "stage", "model", "datasets", "train", "lr", "global batch", "ZeRO", "enabled")
    for recipe in found.values():
        for s in recipe.stages:
            datasets = ", ".join(f"{d.spec}x{d.weight:g}" for d in s.datasets)
            train = "+".join(s.train) + (f" (LoRA r{s.lora.r})" if s.lora else "")
            table.add_row(recipe.name, s.name, s.model, datasets, train, _rates(s.optim), str(s.global_batch),
                          str(s.zero_stage), "yes" if s.enabled else "no")  # fmt: skip
    console.print(table)


def _rates(optim: Any) -> str:
    """``lr``, plus each part's own rate (``projector 0.001``)."""
    parts = [f"{part} {rate:g}" for part in ("projector", "vision") if (rate := getattr(optim, f"{part}_lr"))]
    return f"{optim.lr:g}" + (f" ({', '.join(parts)})" if parts else "")


@recipes_app.command("validate")
def validate(
    files: Annotated[
        list[Path] | None, typer.Argument(help="Recipe files (default: every recipe found).")
    ] = None,
) -> None:
    """Validate recipe files with their bases; every error names file, line and field."""
    from tasks.train.recipe_files import load_recipe
    from tasks.train.recipes import RecipeError, recipe_files

    known = recipe_files()
    targets = files or list(known.values())
    problems: list[str] = []
    for file in targets:
        try:
            recipe = load_recipe(file.stem, {**known, file.stem: file})
            stages = ", ".join(s.name for s in recipe.enabled_stages())
            console.print(f"[green]ok[/green] {file} ({recipe.name}: {stages})", highlight=False)
        except (RecipeError, KeyError) as err:
            problems.extend(err.problems if isinstance(err, RecipeError) else [f"{file}: {err.args[0]}"])
    _print_problems(problems)
    if problems:
        raise typer.Exit(1)
    console.print(f"{len(targets)} recipe(s) valid")


def _print_problems(problems: list[str]) -> None:
    for problem in problems:
        console.print(f"[red]error[/red] {problem}", highlight=False)
