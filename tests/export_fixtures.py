"""Fixtures for the export, quantize, bench and device tests (a pytest plugin: ``pytest_plugins``).

* ``trained_vlm``: the ``mobilevlm-tiny-336`` row (tiny widths, CLIP-L/14-336 geometry, which is
  what llama.cpp's LDP graph needs) trained for a few seconds to name the colour of a square, saved
  with its tokenizer.
* ``f32_export`` / ``f16_export``: its GGUF exports.
* ``mlflow_server``: a real ``mlflow server`` on 127.0.0.1 (SQLite backend, proxied artifacts)
  that a test can stop and start again on the same port and store.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tasks.train.loader import collate

TRAIN_QUESTIONS = ("What colour is this?", "Which color do you see?", "Name the color of the shape.")
COLOURS = ("red", "green", "blue", "yellow")
TRAIN_STEPS = 40


def _samples(tokenizer) -> tuple[list[dict[str, list[int]]], list[str]]:
    from model.conversation import tokenize_conversation

    samples, colours = [], []
    for colour in COLOURS:
        for question in TRAIN_QUESTIONS:
            conv = [
                {"from": "human", "value": f"<image>\n{question}"},
                {"from": "gpt", "value": f"It is {colour}."},
            ]
            samples.append(tokenize_conversation(conv, tokenizer, "v1"))
            colours.append(colour)
    return samples, colours


def train_tiny_vlm(
    tokenizer, out: Path, name: str = "mobilevlm-tiny-336", steps: int = TRAIN_STEPS, lr: float = 3e-3
) -> Path:
    """Train ``name`` to answer colour questions about generated squares; save it with the tokenizer."""
    import model

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest and immune to busy neighbours
    try:
        return _train(model.build(name, vocab_size=len(tokenizer)), tokenizer, out, steps, lr)
    finally:
        torch.set_num_threads(threads)


def _train(vlm, tokenizer, out: Path, steps: int, lr: float) -> Path:
    from model.image import preprocess_images
    from tasks.ship.export_checks import generated_image

    size = vlm.config.vision_config["image_size"]
    samples, colours = _samples(tokenizer)
    batch = collate([{**s, "image": None} for s in samples], pad_id=0)
    images = preprocess_images([generated_image(c, size) for c in colours], size, "pad")
    optimizer = torch.optim.AdamW([p for p in vlm.parameters() if p.requires_grad], lr=lr)
    vlm.train()
    for _ in range(steps):
        loss = vlm(**batch, images=images).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    vlm.eval()
    from model.checkpoint import save_checkpoint

    save_checkpoint(vlm, out, tokenizer=tokenizer)
    return out


@pytest.fixture(scope="session")
def trained_vlm(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    """Checkpoint of the trained ``mobilevlm-tiny-336`` (with tokenizer.json)."""
    return train_tiny_vlm(tiny_tokenizer, tmp_path_factory.mktemp("ckpt") / "tiny-336")


@pytest.fixture(scope="session")
def f32_export(tmp_path_factory: pytest.TempPathFactory, trained_vlm: Path):
    """f32 language model + f32 mmproj export of ``trained_vlm``."""
    from tasks.ship.export import ExportConfig, export_checkpoint

    return export_checkpoint(
        trained_vlm, tmp_path_factory.mktemp("export") / "f32", ExportConfig("f32", "f32")
    )


@pytest.fixture(scope="session")
def f16_export(tmp_path_factory: pytest.TempPathFactory, trained_vlm: Path):
    """Default (f16) export of ``trained_vlm``."""
    from tasks.ship.export import export_checkpoint

    return export_checkpoint(trained_vlm, tmp_path_factory.mktemp("export") / "f16")


# --- MLflow -------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """A real ``mlflow server`` subprocess on 127.0.0.1 that can be stopped and started again."""

    def __init__(
        self, root: Path, port: int, app_name: str | None = None, env: dict[str, str] | None = None
    ) -> None:
        self.root, self.port = root, port
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None
        self.app_name, self.env = app_name, env or {}

    def start(self, timeout: float = 90.0) -> None:
        """Start the server and wait until /health answers."""
        command = [
            sys.executable, "-m", "mlflow", "server",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", str(self.root / "artifacts"),
            "--workers", "1",
        ]  # fmt: skip
        command += ["--app-name", self.app_name] if self.app_name else []
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - closed with the process
        env = {**os.environ, **self.env}
        self.process = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.healthy():
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        raise TimeoutError(f"mlflow server on {self.url} did not answer within {timeout}s")

    def healthy(self) -> bool:
        """True when the server answers /health."""
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the server (its process group) and wait for it."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            self.process.wait(timeout=30)
        self.process = None


class PrefectServer:
    """A real ``prefect server start`` subprocess on 127.0.0.1 with its SQLite database under ``home``
    (``home / "prefect.db"``), optionally asking for ``auth`` (``PREFECT_SERVER_API_AUTH_STRING``)."""

    def __init__(self, home: Path, auth: str | None = None) -> None:
        self.home, self.auth, self.port = home, auth, free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> None:
        """Start the server and wait until /health answers (or asks for credentials)."""
        self.home.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PREFECT_HOME": str(self.home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "PREFECT_API_URL": ""}  # fmt: skip
        if self.auth:
            env["PREFECT_SERVER_API_AUTH_STRING"] = self.auth
        command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                   "--port", str(self.port)]  # fmt: skip
        log = open(self.home / "server.log", "ab")  # noqa: SIM115 - closed with the process
        self.process = subprocess.Popen(command, stdout=log, stderr=log, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2):
                    return
            except OSError as err:
                if getattr(err, "code", None) == 401:  # up, and asking for credentials
                    return
                if self.process.poll() is not None:
                    tail = (self.home / "server.log").read_text()[-2000:]
                    raise RuntimeError(f"prefect server exited: {tail}") from None
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"prefect server on {self.url} did not answer within {timeout}s")

    def stop(self) -> None:
        """Stop the server (its process group) and wait for it."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            self.process.wait(timeout=30)
        self.process = None


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A running ``mlflow server`` for the session (tests that stop it start it again)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"), free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tiny_quant(tmp_path_factory: pytest.TempPathFactory, f16_export):
    """q4_0 quantization of the f16 export (with its mmproj copied beside it)."""
    from tasks.ship.quantize import quantize

    return quantize(f16_export.llm, "q4_0", tmp_path_factory.mktemp("quant") / "q4_0")


@pytest.fixture
def fast_mlflow_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """No HTTP retries: a stopped server fails a request at once instead of after minutes of backoff."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


# --- llama.cpp binaries and sshd ------------------------------------------------------------------


@pytest.fixture(scope="session")
def llama_cpp_bin() -> Path:
    """Folder with llama.cpp's llama-completion, llama-mtmd-cli and llama-bench: ``MVLM_LLAMACPP_BIN``, else
    the build of ``make llama-cpp-programs`` (which ``make test`` runs) at the installed llama.cpp commit."""
    from tasks.testkit.llama_cpp_source import PROGRAMS, programs_folder

    chosen = os.environ.get("MVLM_LLAMACPP_BIN")
    folder = Path(chosen) if chosen else programs_folder()
    if not all((folder / p).is_file() for p in PROGRAMS):
        pytest.skip(
            f"no llama.cpp programs in {folder}: run `make llama-cpp-programs` (make test does) or set "
            "MVLM_LLAMACPP_BIN to a llama.cpp build's bin/ folder (see infra/runners/README.md)"
        )
    return folder


class SshServer:
    """A real sshd on 127.0.0.1 with a throwaway host key and one authorised user key."""

    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port = root, port
        self.key = root / "user_key"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        """Generate keys, write a config, start sshd and wait for the port."""
        for name in ("host_key", "user_key"):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.root / name)], check=True
            )
        (self.root / "authorized_keys").write_text((self.root / "user_key.pub").read_text())
        (self.root / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.root / 'host_key'}\n"
            f"AuthorizedKeysFile {self.root / 'authorized_keys'}\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nPermitRootLogin prohibit-password\n"
            f"StrictModes no\nUsePAM no\nPidFile {self.root / 'sshd.pid'}\n"
            "Subsystem sftp /usr/lib/openssh/sftp-server\n"
        )
        log = open(self.root / "sshd.log", "ab")  # noqa: SIM115 - closed with the process
        command = ["/usr/sbin/sshd", "-D", "-e", "-f", str(self.root / "sshd_config")]
        self.process = subprocess.Popen(command, stdout=log, stderr=log)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"sshd did not listen: {(self.root / 'sshd.log').read_text()[-1000:]}")

    def stop(self) -> None:
        """Stop sshd."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


@pytest.fixture(scope="session")
def ssh_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    """sshd on 127.0.0.1 when this machine has it (``openssh-server``) and may run it."""
    if not Path("/usr/sbin/sshd").is_file() or not shutil.which("ssh-keygen"):
        pytest.skip("no sshd here: install openssh-server to test the ssh transport")
    privsep = Path("/run/sshd")
    if not privsep.is_dir():
        if os.geteuid() != 0:
            pytest.skip("sshd needs /run/sshd (privilege separation) and we are not root")
        privsep.mkdir(mode=0o755, parents=True)
    server = SshServer(tmp_path_factory.mktemp("sshd"), free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Tiny models: one torch thread is fastest and does not stall when the machine is busy."""
    from tasks.ship.export import torch_threads

    with torch_threads(1):
        yield
