"""Cluster and server descriptions under infra/: what can be checked without a cloud or Kubernetes.

The Ray launcher config goes through Ray's own ``prepare_config`` + ``validate_config`` (what
``ray up`` does before it talks to AWS); the KubeRay manifests are checked against the recipes they
run; the Prefect server's systemd unit runs for real against a private PostgreSQL set up with
``infra/servers/postgres-setup.sql``.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import ray
import yaml

from tasks.train.recipes import get_recipe

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
PLACEHOLDER = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)\}")
SETTINGS_VARS = {
    "MVLM_WORK_DIR",
    "MVLM_DATA_ROOT",
    "MVLM_RUNS_ROOT",
    "MLFLOW_TRACKING_URI",
    "PREFECT_API_URL",
}


def _pg_bin() -> Path:
    """The bin folder of the newest PostgreSQL installed from Debian's packages (any version)."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0,
    )
    return found[-1].parent if found else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _pg_bin()


def _placeholders(text: str) -> set[str]:
    """``${NAME}`` in the non-comment lines of a YAML file."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    return set(PLACEHOLDER.findall("\n".join(lines)))


def _envsubst_names(text: str) -> set[str]:
    """The variables named in the file's documented ``envsubst '$A $B'`` command."""
    match = re.search(r"envsubst '([^']*)'", text)
    assert match, "the file documents no envsubst command"
    return {name.lstrip("$") for name in match.group(1).split()}


def _fill(text: str, values: dict[str, str]) -> str:
    return PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), text)


def _example_values(names: set[str]) -> dict[str, str]:
    return {name: f"example-{name.lower().replace('_', '-')}" for name in names}


def _load_all(path: Path) -> list:
    text = path.read_text()
    return [doc for doc in yaml.safe_load_all(_fill(text, _example_values(_placeholders(text)))) if doc]


def test_every_infra_yaml_parses_and_documents_its_placeholders() -> None:
    files = sorted([*INFRA.rglob("*.yaml"), *INFRA.rglob("*.yml")])
    assert {"cluster.yaml", "raycluster.yaml", "rayjob.yaml", "config.yaml"} <= {f.name for f in files}
    for path in files:
        docs = _load_all(path)
        assert docs, f"{path} is empty"
        text = path.read_text()
        if _placeholders(text):  # every ${VAR} is filled by the envsubst command its header gives
            assert _envsubst_names(text) == _placeholders(text), path


def test_ray_cluster_config_passes_ray_validation() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    text = (INFRA / "ray" / "cluster.yaml").read_text()
    raw = yaml.safe_load(_fill(text, _example_values(_placeholders(text))))
    config = prepare_config(raw)
    validate_config(config)  # Ray's ray-schema.json

    assert config["provider"]["type"] == "aws"
    assert config["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert config["docker"]["head_image"] == f"rayproject/ray:{ray.__version__}-py311-cpu"
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    gpu_types = {t["node_config"]["InstanceType"]: t["max_workers"] for t in types.values()}
    assert gpu_types["p4d.24xlarge"] == gpu_types["p5.48xlarge"] == 20  # 20 x 8 GPUs, as in the paper
    pretrain = get_recipe("mobilevlm-1.7b").stage("llm-pretrain")
    assert pretrain.num_workers == 20 * 8

    setup = "\n".join(config["setup_commands"])
    assert "pip install -q -e ." in setup
    for name in SETTINGS_VARS | {"RAY_AUTH_MODE"}:
        assert f"'{name}=" in setup, name
    assert "/mnt/mvlm/data" in setup and "/mnt/mvlm/runs" in setup
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if "ray start" in command:
            assert ". ~/mvlm.env" in command  # Ray processes (and so workers) inherit the settings


def _containers(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _check_cluster_spec(spec: dict) -> dict:
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for container in _containers(spec):
        assert container["image"] == "example-mvlm-image"
        assert {"configMapRef": {"name": "mvlm-env"}} in container["envFrom"]
        assert {"name": "shared", "mountPath": "/mnt/mvlm"} in container["volumeMounts"]
    gpu = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu")
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "8"
    return gpu


def test_kuberay_cluster_and_job_fit_the_recipe() -> None:
    (cluster,) = _load_all(INFRA / "kuberay" / "raycluster.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert _check_cluster_spec(cluster["spec"])["maxReplicas"] == 20

    (job,) = _load_all(INFRA / "kuberay" / "rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["spec"]["entrypoint"] == "mvlm train mobilevlm-1.7b --stage vlm-align"
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    gpu = _check_cluster_spec(job["spec"]["rayClusterSpec"])
    stage = get_recipe("mobilevlm-1.7b").stage("vlm-align")  # the entrypoint names a real stage
    per_worker = stage.resources_per_worker
    cpu_limit = int(gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    assert gpu["replicas"] * 8 == stage.num_workers * per_worker["GPU"]
    assert cpu_limit >= 8 * per_worker["CPU"]

    config, pvc = _load_all(INFRA / "kuberay" / "config.yaml")
    assert config["kind"] == "ConfigMap" and set(config["data"]) >= SETTINGS_VARS
    assert config["data"]["MVLM_DATA_ROOT"].startswith("/mnt/mvlm/")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_settings_variables_are_in_the_servers_env_table() -> None:
    readme = (INFRA / "servers" / "README.md").read_text()
    for name in SETTINGS_VARS | {"RAY_ADDRESS", "PREFECT_API_DATABASE_CONNECTION_URL"}:
        assert f"`{name}`" in readme, name


# --- the Prefect server unit, for real, on a private PostgreSQL ------------------------------------


def _unit(path: Path) -> dict[str, list[str]]:
    """Key -> values of a systemd unit file (continuation lines joined)."""
    out: dict[str, list[str]] = {}
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def _env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line and line[0] != "#")
    return {k: v.strip('"') for k, v in pairs}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


def _stop(proc: subprocess.Popen | None, sig: int = signal.SIGTERM) -> None:
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _postgres_usable() -> bool:
    return (PG_BIN / "initdb").exists() and shutil.which("runuser") is not None and os.geteuid() == 0


@pytest.mark.slow
def test_prefect_server_unit_runs_a_flow_on_postgresql() -> None:
    """postgres-setup.sql, then the unit's ExecStart with prefect.env (addresses made local): a flow
    run through that API lands in PostgreSQL, with Prefect's migrations applied by its own role."""
    pg_port, api_port = _free_port(), _free_port()
    if not _postgres_usable():
        if os.environ.get("CI"):  # .ci/run installs PostgreSQL: a CI run must not skip this
            pytest.fail(
                "PostgreSQL not found under /usr/lib/postgresql/*/bin (or not root); .ci/run installs it"
            )
        pytest.skip("needs PostgreSQL binaries (Debian's postgresql package) and root (runuser)")
    work = Path(tempfile.mkdtemp(prefix="mvlm-pg-"))  # postgres must reach it: not under pytest's 0700 dir
    work.chmod(0o755)
    shutil.chown(work, "postgres", "postgres")
    as_pg = ["runuser", "-u", "postgres", "--"]
    postgres = prefect = None
    try:
        initdb = [str(PG_BIN / "initdb"), "-D", f"{work}/data", "-U", "postgres", "--auth-local=trust",
                  "--auth-host=scram-sha-256"]  # fmt: skip
        subprocess.run([*as_pg, *initdb], check=True, capture_output=True)
        server = [str(PG_BIN / "postgres"), "-D", f"{work}/data", "-k", str(work), "-h", "127.0.0.1",
                  "-p", str(pg_port)]  # fmt: skip
        postgres = subprocess.Popen(
            [*as_pg, *server], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        psql = [*as_pg, "psql", "-h", str(work), "-p", str(pg_port), "-U", "postgres"]
        deadline = time.monotonic() + 30
        while subprocess.run([*psql, "-c", "select 1"], capture_output=True).returncode != 0:
            assert time.monotonic() < deadline and postgres.poll() is None, "PostgreSQL did not start"
            time.sleep(0.3)
        password = "pw-" + os.urandom(8).hex()
        sql = INFRA / "servers" / "postgres-setup.sql"
        setup = [*psql, "-v", "ON_ERROR_STOP=1", "-v", f"prefect_password={password}",
                 "-v", f"mlflow_password={password}", "-f", str(sql)]  # fmt: skip
        subprocess.run(setup, check=True, capture_output=True)

        unit = _unit(INFRA / "servers" / "prefect-server.service")
        assert unit["EnvironmentFile"] == ["/etc/mvlm/prefect.env"]
        env_text = (INFRA / "servers" / "env" / "prefect.env.example").read_text()
        env_text = env_text.replace("CHANGE_ME", password).replace("10.0.0.5", "127.0.0.1")
        env_text = env_text.replace(":5432/", f":{pg_port}/").replace("4200", str(api_port))
        (work / "prefect.env").write_text(env_text)
        service_env = _env_file(work / "prefect.env")
        assert service_env["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://prefect:")
        service_env.update(v.split("=", 1) for v in unit.get("Environment", []))
        service_env["PREFECT_HOME"] = str(work / "prefect-home")
        (command,) = unit["ExecStart"]
        argv = shlex.split(command.replace("/opt/mvlm/servers/bin/", str(Path(sys.executable).parent) + "/"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | service_env
        prefect = subprocess.Popen(
            argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        _wait_http(f"http://127.0.0.1:{api_port}/api/health", prefect, 150)

        client_env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        client_env["PREFECT_API_URL"] = f"http://127.0.0.1:{api_port}/api"
        client_env["PREFECT_HOME"] = str(work / "client-home")
        client_env["PREFECT_API_AUTH_STRING"] = service_env["PREFECT_SERVER_API_AUTH_STRING"]  # else 401
        script = (
            "from prefect import flow, task\n"
            "@task\ndef add(a, b):\n    return a + b\n"
            "@flow(name='infra-servers-check')\ndef check():\n    return add(2, 3)\n"
            "assert check() == 5\n"
        )
        client = subprocess.run(
            [sys.executable, "-c", script], env=client_env, capture_output=True, text=True, timeout=300
        )
        assert client.returncode == 0, f"the flow through the unit's API failed:\n{client.stderr[-3000:]}"

        query = ("select f.name || ':' || r.state_type from flow_run r join flow f on f.id = r.flow_id; "
                 "select extname from pg_extension where extname = 'pg_trgm';")  # fmt: skip
        rows = subprocess.run(
            [*psql, "-d", "prefect", "-Atc", query], check=True, capture_output=True, text=True
        )
        assert rows.stdout.split() == ["infra-servers-check:COMPLETED", "pg_trgm"]
    finally:
        _stop(prefect)
        _stop(postgres, signal.SIGINT)  # fast shutdown
        shutil.rmtree(work, ignore_errors=True)
