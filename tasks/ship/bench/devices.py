"""Device classes (Prefect work pools) from ``infra/runners/pools.yaml``, and their backends."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tasks.ship.bench.binary import BinaryBackend
from tasks.ship.bench.protocol import BenchSettings, PythonBackend
from tasks.ship.bench.transports import AdbTransport, LocalTransport, SshTransport

POOLS_FILE = Path(__file__).resolve().parents[3] / "infra" / "runners" / "pools.yaml"
"""Device classes, one per Prefect work pool; ``MVLM_POOLS_FILE`` points elsewhere."""


class SshTarget(BaseModel):
    """Where an ssh transport connects."""

    model_config = ConfigDict(extra="forbid")
    host: str
    """Host name or address of the board."""
    user: str | None = None
    """Login user."""
    port: int = 22
    """ssh port."""
    identity: str | None = None
    """Private key file on the runner."""


class DeviceClass(BaseModel):
    """One device class: a Prefect work pool, what runs the model there and how the runner reaches it."""

    model_config = ConfigDict(extra="forbid")
    name: str = ""
    """Pool name (the key in pools.yaml)."""
    description: str
    """What the device is and where the runner sits."""
    soc: str
    """System on chip / CPU, as reported in results."""
    backend: Literal["python", "binary"] = "python"
    """``python``: llama-cpp-python in the flow process; ``binary``: llama.cpp's programs on the device."""
    transport: Literal["local", "adb", "ssh"] = "local"
    """How the runner reaches the device (``binary`` backend)."""
    threads: int = 4
    """CPU threads for llama.cpp."""
    gpu_layers: int = 0
    """Layers offloaded to the GPU (CUDA builds)."""
    extra_buffers: bool = False
    """llama.cpp CPU repack/AMX buffers (``python`` backend)."""
    bin_dir: str | None = None
    """Folder of the llama.cpp binaries on the device (``binary`` backend)."""
    lib_dir: str | None = None
    """Folder of llama.cpp's shared libraries on the device, when it does not find them itself (Android)."""
    work_dir: str = "/tmp/mvlm-bench"
    """Folder on the device for model files (``binary`` backend)."""
    time_v: bool = True
    """Measure peak RSS with ``/usr/bin/time -v`` on the device (not available on stock Android)."""
    adb_serial: str | None = None
    """adb device serial (``adb`` transport)."""
    ssh: SshTarget | None = None
    """Connection (``ssh`` transport)."""
    paper: dict[str, dict[str, float]] = Field(default_factory=dict)
    """The paper's numbers for this device by model and metric (shown beside ours in reports)."""

    @model_validator(mode="after")
    def _consistent(self) -> DeviceClass:
        if self.backend == "binary" and not self.bin_dir:
            raise ValueError(
                f"pool {self.name!r}: backend 'binary' needs bin_dir (llama.cpp binaries on the device)"
            )
        if self.transport == "ssh" and self.ssh is None:
            raise ValueError(f"pool {self.name!r}: transport 'ssh' needs an ssh: {{host: ...}} section")
        if self.backend == "python" and self.transport != "local":
            raise ValueError(
                f"pool {self.name!r}: the python backend runs in the runner; use transport 'local'"
            )
        return self


def load_pools(path: str | Path | None = None) -> dict[str, DeviceClass]:
    """Every device class in the pools file (errors name the file and the field)."""
    import yaml

    file = Path(path or os.environ.get("MVLM_POOLS_FILE") or POOLS_FILE)
    if not file.is_file():
        raise FileNotFoundError(f"pools file {file} does not exist; see infra/runners/README.md")
    data = yaml.safe_load(file.read_text()) or {}
    pools = {}
    for name, spec in (data.get("pools") or {}).items():
        try:
            pools[name] = DeviceClass(name=name, **spec)
        except ValidationError as err:
            raise ValueError(f"{file}: pool {name!r} is invalid: {err}") from err
    return pools


def device_class(name: str, path: str | Path | None = None) -> DeviceClass:
    """The device class ``name``."""
    pools = load_pools(path)
    if name not in pools:
        raise KeyError(f"unknown pool {name!r}; pools file has: {sorted(pools)}")
    return pools[name]


def transport_for(device: DeviceClass) -> Any:
    """The transport a device class uses."""
    if device.transport == "adb":
        return AdbTransport(device.adb_serial)
    if device.transport == "ssh":
        assert device.ssh is not None
        return SshTransport(device.ssh.host, device.ssh.user, device.ssh.port, device.ssh.identity)
    return LocalTransport()


def backend_for(device: DeviceClass) -> PythonBackend | BinaryBackend:
    """The backend a device class uses."""
    if device.backend == "binary":
        assert device.bin_dir is not None
        return BinaryBackend(
            transport_for(device), device.bin_dir, device.work_dir, device.time_v, device.lib_dir
        )
    return PythonBackend()


def settings_for(device: DeviceClass, overrides: dict[str, Any] | None = None) -> BenchSettings:
    """Protocol settings on a device: its threads / GPU layers / buffers, then explicit overrides."""
    base = BenchSettings(
        threads=device.threads, gpu_layers=device.gpu_layers, extra_buffers=device.extra_buffers
    )
    try:
        return dataclasses.replace(base, **(overrides or {}))
    except TypeError as err:
        fields = sorted(f.name for f in dataclasses.fields(BenchSettings))
        raise ValueError(
            f"unknown benchmark setting in {sorted(overrides or {})}; allowed: {fields}"
        ) from err
