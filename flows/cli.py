"""The ``mvlm`` command line: a root app that each area's module registers its commands on.

Commands parse, call a task or flow, and print; nothing else. Heavy imports stay inside commands so
``mvlm --help`` is fast.
"""

from __future__ import annotations

import os
from typing import Annotated

import typer

from flows import cli_data, cli_eval, cli_export, cli_model, cli_retrain, cli_servers, cli_train
from flows.logs import setup_logging

app = typer.Typer(
    help="MobileVLM pipeline: models, data, training, export, device benchmarks.", no_args_is_help=True
)


@app.callback()
def _main(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Debug logging; library and Ray output on the console.")
    ] = False,
) -> None:
    setup_logging(verbose)  # everything also goes to work_dir/logs/ (the path is printed on errors)
    if not os.environ.get("PREFECT_API_URL"):  # our own ephemeral server: offline, no telemetry
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        # Prefect waits 20 s for it by default; a busy machine (a build's Ray workers, a CI box) needs more
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


for _module in (cli_model, cli_data, cli_train, cli_export, cli_retrain, cli_eval, cli_servers):
    _module.register(app)


if __name__ == "__main__":
    app()
