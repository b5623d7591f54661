"""Accounts on an MLflow server that authenticates (``mlflow server --app-name basic-auth``).

A device runner (a phone host or a Jetson board) pushes its results over the network, so it gets its
own account with the least it needs: ``EDIT`` on the pipeline's experiment (create runs, log params,
metrics and artifacts, read the quantized models it benchmarks) and nothing else. The server's
``default_permission = NO_PERMISSIONS`` (``infra/servers/mlflow-auth.ini``) keeps it out of every
other experiment and every registered model, and ``EDIT`` cannot delete runs, so it cannot delete a
run or move a model alias. ``add_runner`` is run by an admin; every credential comes from the
environment (the admin's ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``, which MLflow's
client reads itself, and the runner's password from a variable named by the caller), never from a
file of ours or an argument.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from tasks.lineage.tracking import EXPERIMENT, client, experiment_id, tracking_uri

log = logging.getLogger(__name__)

RUNNER_PERMISSION = "EDIT"
"""What a runner may do in the pipeline's experiment (MLflow's EDIT: read and write, not delete)."""
PASSWORD_VARIABLE = "MVLM_RUNNER_PASSWORD"
"""The environment variable ``add_runner`` reads the runner's password from by default."""


class AccountError(RuntimeError):
    """An account could not be set up (message says what to do)."""


@dataclass(frozen=True)
class RunnerAccount:
    """A runner account as set up on the server."""

    username: str
    """The runner's MLflow user name (its ``MLFLOW_TRACKING_USERNAME``)."""
    experiment: str
    """The experiment it may write to."""
    experiment_id: str
    """That experiment's id."""
    permission: str
    """Its permission there (``RUNNER_PERMISSION``)."""
    created: bool
    """False when the user existed already (its password was reset to the given one)."""


def add_runner(
    username: str,
    uri: str | None = None,
    experiment: str = EXPERIMENT,
    password_variable: str = PASSWORD_VARIABLE,
) -> RunnerAccount:
    """Create (or reset) the runner account ``username`` with ``EDIT`` on ``experiment`` only.

    Run with admin credentials in ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``; the
    runner's password is read from ``password_variable``. The experiment is created if missing."""
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    uri = tracking_uri(uri)
    password = os.environ.get(password_variable, "")
    if not uri.startswith(("http://", "https://")):
        raise AccountError(
            f"{uri} is not an MLflow server: accounts exist only on `mlflow server --app-name basic-auth`"
        )
    if not password:
        raise AccountError(
            f"set {password_variable} to the password for runner {username!r} (it is read from there only)"
        )
    if not os.environ.get("MLFLOW_TRACKING_USERNAME") or not os.environ.get("MLFLOW_TRACKING_PASSWORD"):
        raise AccountError(
            "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an admin account of the server"
        )
    auth = get_app_client("basic-auth", tracking_uri=uri)
    try:
        exp_id = experiment_id(client(uri), experiment)
        created = _create_or_reset(auth, username, password)
        _grant(auth, username, exp_id)
    except MlflowException as err:
        log.debug("MLflow refused the account set-up", exc_info=True)
        raise AccountError(f"MLflow at {uri} refused to set up runner {username!r}: {_reason(err)}") from None
    log.info("runner %s: %s on experiment %s (%s)", username, RUNNER_PERMISSION, experiment, exp_id)
    return RunnerAccount(username, experiment, exp_id, RUNNER_PERMISSION, created)


def _create_or_reset(auth, username: str, password: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        auth.create_user(username, password)
        return True
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    auth.update_user_password(username, password)
    return False


def _grant(auth, username: str, exp_id: str) -> None:
    """``RUNNER_PERMISSION`` on the experiment, replacing what the user had there."""
    from mlflow.exceptions import MlflowException

    try:
        auth.grant_user_permission(username, "experiment", exp_id, RUNNER_PERMISSION)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        auth.revoke_user_permission(username, "experiment", exp_id)
        auth.grant_user_permission(username, "experiment", exp_id, RUNNER_PERMISSION)


def _reason(err: Exception) -> str:
    """What an MLflow refusal means, in words (the server's text is in the log)."""
    code = getattr(err, "error_code", "")
    if code == "UNAUTHENTICATED":
        return "the credentials in MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD are not accepted"
    if code == "PERMISSION_DENIED":
        return "the account in MLFLOW_TRACKING_USERNAME is not an admin of the server"
    return f"{code or type(err).__name__} (details in the log)"
