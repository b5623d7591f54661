"""Servers that other machines reach authenticate: MLflow's basic-auth app with a runner account
(``mvlm servers add-runner``) and Prefect's API auth string, both real servers on 127.0.0.1."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from export_fixtures import MlflowServer, PrefectServer, free_port
from typer.testing import CliRunner

from tasks.lineage import tags as tag
from tasks.lineage.push import Outbox, Payload, flush, push
from tasks.lineage.tracking import EXPERIMENT, client

INFRA = Path(__file__).resolve().parent.parent / "infra" / "servers"
ADMIN = ("admin", secrets.token_hex(12))
RUNNER = ("jetson-orin-01", secrets.token_hex(12))


@pytest.fixture(scope="module")
def auth_mlflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """``mlflow server --app-name basic-auth`` with ``infra/servers/mlflow-auth.ini`` (its user store on
    SQLite here instead of PostgreSQL), the admin password from the environment as in production."""
    root = tmp_path_factory.mktemp("mlflow-auth")
    ini = (INFRA / "mlflow-auth.ini").read_text()
    database = next(line for line in ini.splitlines() if line.startswith("database_uri"))
    (root / "auth.ini").write_text(ini.replace(database, f"database_uri = sqlite:///{root / 'auth.db'}"))
    env = {
        "MLFLOW_AUTH_CONFIG_PATH": str(root / "auth.ini"),
        "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
    }
    server = MlflowServer(root, free_port(), app_name="basic-auth", env=env)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _as(monkeypatch: pytest.MonkeyPatch, account: tuple[str, str] | None) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    for name, value in zip(
        ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"), account or ("", ""), strict=True
    ):
        if account:
            monkeypatch.setenv(name, value)
        else:
            monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def runner_account(auth_mlflow: MlflowServer) -> dict[str, str]:
    """The runner account, made with ``mvlm servers add-runner`` as the admin; a registered model with
    a ``champion`` alias and another team's experiment, made by the admin."""
    from flows.cli import app

    env = {
        "MLFLOW_TRACKING_URI": auth_mlflow.url,
        "MLFLOW_TRACKING_USERNAME": ADMIN[0],
        "MLFLOW_TRACKING_PASSWORD": ADMIN[1],
        "MVLM_RUNNER_PASSWORD": RUNNER[1],
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        result = CliRunner().invoke(app, ["servers", "add-runner", RUNNER[0]])
        assert result.exit_code == 0, result.output
        assert f"runner {RUNNER[0]} created: EDIT on experiment {EXPERIMENT}" in " ".join(
            result.output.split()
        )
        again = CliRunner().invoke(app, ["servers", "add-runner", RUNNER[0]])  # idempotent: a reset
        assert again.exit_code == 0 and "reset" in again.output, again.output
        admin = client(auth_mlflow.url)
        run = admin.create_run(admin.get_experiment_by_name(EXPERIMENT).experiment_id)
        admin.log_text(run.info.run_id, "weights", "model/weights.txt")
        admin.create_registered_model("mobilevlm-tiny")
        version = admin.create_model_version(
            "mobilevlm-tiny", f"runs:/{run.info.run_id}/model", run.info.run_id
        )
        admin.set_registered_model_alias("mobilevlm-tiny", "champion", version.version)
        other = admin.create_experiment("another-team")
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    return {"version": version.version, "other": other}


def _payload(identity: str) -> Payload:
    return Payload(
        identity=identity,
        run_name=f"device-bench {identity}",
        tags={"mvlm.device": "jetson-orin"},
        params={"threads": "4"},
        metrics={"decode_tok_s": 21.5, "prefill_tok_s": 130.25},
        artifacts={"bench.json": {"decode_tok_s": 21.5}},
    )


def _runs_of(server: MlflowServer, monkeypatch: pytest.MonkeyPatch, identity: str) -> list:
    _as(monkeypatch, ADMIN)
    admin = client(server.url)
    exp = admin.get_experiment_by_name(EXPERIMENT).experiment_id
    return admin.search_runs([exp], filter_string=f"tags.`mvlm.identity` = '{identity}'")


def test_an_unauthenticated_push_is_refused_and_nothing_is_written(
    auth_mlflow: MlflowServer, runner_account: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outbox = Outbox(tmp_path / "outbox")
    outbox.put(_payload("bench-anonymous"))
    outbox.put(_payload("bench-anonymous-2"))
    for account, said in ((None, "refused no credentials"), ((RUNNER[0], "wrong"), "refused the password")):
        _as(monkeypatch, account)
        report = flush(outbox, auth_mlflow.url)
        assert report.sent == {} and sorted(report.kept) == ["bench-anonymous", "bench-anonymous-2"]
        assert report.refused and said in report.refused, report.refused
        assert sorted(p.identity for p in outbox.pending()) == sorted(report.kept)  # still waiting
    assert _runs_of(auth_mlflow, monkeypatch, "bench-anonymous") == []
    assert _runs_of(auth_mlflow, monkeypatch, "bench-anonymous-2") == []


def test_the_runner_push_lands_once_and_the_runner_cannot_delete_move_aliases_or_read_others(
    auth_mlflow: MlflowServer, runner_account: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.exceptions import MlflowException

    outbox = Outbox(tmp_path / "outbox")
    outbox.put(_payload("bench-runner"))
    _as(monkeypatch, RUNNER)
    report = flush(outbox, auth_mlflow.url)
    assert report.refused is None and report.kept == [] and list(report.sent) == ["bench-runner"]
    assert outbox.pending() == []
    assert push(_payload("bench-runner"), auth_mlflow.url) == report.sent["bench-runner"]  # idempotent
    runs = _runs_of(auth_mlflow, monkeypatch, "bench-runner")
    assert [r.info.run_id for r in runs] == [report.sent["bench-runner"]]
    assert runs[0].data.metrics == {"decode_tok_s": 21.5, "prefill_tok_s": 130.25}
    assert runs[0].data.tags[tag.COMPLETE] == "true"

    _as(monkeypatch, RUNNER)
    runner = client(auth_mlflow.url)
    refused = {
        "delete a run": lambda: runner.delete_run(report.sent["bench-runner"]),
        "move the champion alias": lambda: runner.set_registered_model_alias(
            "mobilevlm-tiny", "champion", "1"
        ),
        "edit a registered model": lambda: runner.update_registered_model("mobilevlm-tiny", "mine now"),
        "read another experiment": lambda: runner.get_experiment(runner_account["other"]),
    }
    for what, attempt in refused.items():
        with pytest.raises(MlflowException) as err:
            attempt()
        assert err.value.error_code == "PERMISSION_DENIED", what
    _as(monkeypatch, ADMIN)
    admin = client(auth_mlflow.url)
    assert admin.get_run(report.sent["bench-runner"]).info.lifecycle_stage == "active"
    alias = admin.get_model_version_by_alias("mobilevlm-tiny", "champion")
    assert alias.version == runner_account["version"]


def test_add_runner_says_what_is_missing(auth_mlflow: MlflowServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.lineage.accounts import AccountError, add_runner

    _as(monkeypatch, ADMIN)
    monkeypatch.delenv("MVLM_RUNNER_PASSWORD", raising=False)
    with pytest.raises(AccountError, match="set MVLM_RUNNER_PASSWORD"):
        add_runner("pixel-9", auth_mlflow.url)
    monkeypatch.setenv("MVLM_RUNNER_PASSWORD", "pw-" + secrets.token_hex(6))
    _as(monkeypatch, RUNNER)  # not an admin
    with pytest.raises(AccountError, match="is not an admin of the server"):
        add_runner("pixel-9", auth_mlflow.url)


# --- Prefect -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_prefect(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """``prefect server start`` on 127.0.0.1 with ``PREFECT_SERVER_API_AUTH_STRING``; (api url, auth)."""
    server = PrefectServer(tmp_path_factory.mktemp("prefect-auth"), auth=f"admin:{secrets.token_hex(12)}")
    server.start()
    try:
        yield server.url, server.auth
    finally:
        server.stop()


FLOW = textwrap.dedent(
    """
    import json, sys
    from prefect import flow
    from prefect.client.orchestration import get_client

    @flow
    def hello(x: int) -> int:
        return x + 1

    try:
        with get_client(sync_client=True) as c:
            c.read_flows(limit=1)
        print(json.dumps({"result": hello(41)}))
    except Exception as err:
        print(json.dumps({"error": type(err).__name__, "status": getattr(getattr(err, "response", None),
                          "status_code", None)}))
    """
)


def _client_run(url: str, auth: str | None, tmp_path: Path) -> dict:
    env = {**os.environ, "PREFECT_API_URL": url, "PREFECT_HOME": str(tmp_path / "client-home")}
    env.pop("PREFECT_API_AUTH_STRING", None)
    if auth:
        env["PREFECT_API_AUTH_STRING"] = auth
    out = subprocess.run([sys.executable, "-c", FLOW], env=env, capture_output=True, text=True, timeout=180)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_prefect_refuses_a_client_without_the_auth_string_and_runs_a_flow_with_it(
    auth_prefect: tuple[str, str], tmp_path: Path
) -> None:
    url, auth = auth_prefect
    assert _client_run(url, None, tmp_path) == {"error": "PrefectHTTPStatusError", "status": 401}
    assert _client_run(url, "admin:wrong", tmp_path)["status"] == 401
    assert _client_run(url, auth, tmp_path) == {"result": 42}
