"""What the command groups share: a group whose first word, when it is not a subcommand, goes to a
default subcommand (``mvlm bench MODEL`` = ``mvlm bench submit MODEL``), and the one-line error."""

from __future__ import annotations

import click
import typer
from typer.core import TyperGroup

from flows.logs import console


def default_command_group(default: str) -> type[TyperGroup]:
    """A Typer group class that sends ``GROUP ARG ...`` to ``GROUP <default> ARG ...``."""

    class DefaultCommandGroup(TyperGroup):
        def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
            if args and not args[0].startswith("-") and args[0] not in self.commands:
                args = [default, *args]
            return super().parse_args(ctx, args)

    return DefaultCommandGroup


def fail(message: str) -> typer.Exit:
    """Print ``error: message`` (ours, one line) and return the exit to raise (code 2)."""
    console.print(f"[red]error:[/red] {message}", markup=True, highlight=False, soft_wrap=True)
    return typer.Exit(2)
