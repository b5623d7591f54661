"""``mvlm model ...``: named model configurations and the model smoke run."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from flows.logs import console

model_app = typer.Typer(help="Named model configurations.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Attach the ``model`` command group to the root app."""
    app.add_typer(model_app, name="model")


@model_app.command("list")
def model_list() -> None:
    """List every named configuration with its kind."""
    from model.config import config_names, get_config

    table = Table("name", "kind", "hub id")
    for name, kind in config_names().items():
        table.add_row(name, kind, get_config(name).hub_id or "-")
    console.print(table)


@model_app.command("info")
def model_info(
    name: Annotated[str, typer.Argument(help="Config row, see `mvlm model list`.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Parameter counts, visual tokens and shapes of a configuration."""
    import model

    try:
        data = model.info(name)
    except KeyError as err:
        console.print(f"[red]error:[/red] {err.args[0]}")
        raise typer.Exit(2) from err
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    console.print(info_table(data))


def info_table(data: dict) -> Table:
    """A rich table of ``model.info`` output."""
    table = Table("field", "value", title=f"{data['name']} ({data['kind']})")
    for part, count in data["params"].items():
        table.add_row(f"params.{part}", f"{count:,}")
    table.add_row("visual_tokens", str(data["visual_tokens"]))
    for section in ("llm", "vision"):
        for key, value in (data.get(section) or {}).items():
            table.add_row(f"{section}.{key}", str(value))
    if data.get("projector"):
        table.add_row("projector", data["projector"])
    return table


@model_app.command("smoke")
def model_smoke(
    name: Annotated[str, typer.Argument(help="A VLM row small enough for CPU.")] = "mobilevlm-tiny",
    steps: Annotated[int, typer.Option(help="Training steps.")] = 3,
) -> None:
    """Build a tiny MobileVLM, run training steps and a greedy generation on a generated image."""
    import model
    from tasks.testkit.smoke import run_smoke

    result = run_smoke(name, steps=steps)
    console.print(info_table(model.info(name, **result.overrides)))
    console.print(
        f"trainable {result.trainable:,} of {result.params:,} params; "
        f"losses {[round(x, 4) for x in result.losses]}; "
        f"generated {result.generated!r}; {result.seconds:.1f}s"
    )
