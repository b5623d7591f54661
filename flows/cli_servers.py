"""``mvlm servers ...``: accounts on the team's authenticating MLflow server."""

from __future__ import annotations

from typing import Annotated

import typer

from flows.logs import console

servers_app = typer.Typer(help="Accounts on the team's MLflow server (basic-auth).", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Attach the ``servers`` command group to the root app."""
    app.add_typer(servers_app, name="servers")


@servers_app.command("add-runner")
def add_runner_command(
    name: Annotated[str, typer.Argument(help="The runner's MLflow user name, e.g. jetson-orin-01.")],
    password_variable: Annotated[
        str, typer.Option(help="Environment variable holding the runner's password.")
    ] = "MVLM_RUNNER_PASSWORD",
) -> None:
    """Create or reset a device runner's account: EDIT on the pipeline's experiment, nothing else.

    Run as an admin (MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD)."""
    from tasks.lineage.accounts import AccountError, add_runner

    try:
        account = add_runner(name, password_variable=password_variable)
    except AccountError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    verb = "created" if account.created else "reset"
    console.print(
        f"runner {account.username} {verb}: {account.permission} on experiment {account.experiment} "
        f"({account.experiment_id}); give it MLFLOW_TRACKING_USERNAME={account.username} and the password"
    )
