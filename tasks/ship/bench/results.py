"""Benchmark results: running the protocol on a device class, identities and MLflow payloads."""

from __future__ import annotations

import dataclasses
import logging
import math
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.ship.bench.binary import BinaryBackend
from tasks.ship.bench.devices import DeviceClass, backend_for
from tasks.ship.bench.protocol import BenchSettings, Measurement
from tasks.ship.bench.transports import LocalTransport

log = logging.getLogger(__name__)


@dataclass
class BenchResult:
    """One benchmark of one quantized model on one device class, ready for MLflow."""

    identity: str
    """Hash of quant id, device class, backend, transport, settings and protocol version."""
    device: str
    """Pool / device class."""
    soc: str
    """Chip."""
    backend: str
    """What ran the model."""
    transport: str
    """How the runner reached the device."""
    runner_host: str
    """Host of the runner (the Prefect worker's machine)."""
    device_host: str
    """The device's own name."""
    quant_id: str
    """Quantized model identity."""
    quant_type: str
    """llama.cpp type, e.g. q4_k_s."""
    model_size_bytes: int
    """Language-model GGUF size (plus the mmproj for the VLM total)."""
    settings: dict[str, Any]
    """Protocol settings."""
    measurement: Measurement
    """The numbers."""

    def metrics(self) -> dict[str, float]:
        """Flat metrics for MLflow."""
        m = self.measurement
        out: dict[str, float] = {"model_size_gb": self.model_size_bytes / 1e9}
        for prefix, phase in (("lm", m.lm), ("vlm", m.vlm)):
            if phase is not None:
                out |= {
                    f"{prefix}.{k}": float(v) for k, v in dataclasses.asdict(phase).items() if v is not None
                }
        for entry in m.speeds:
            out |= {f"{entry.test}.mean_tps": entry.mean_tps, f"{entry.test}.stddev_tps": entry.stddev_tps}
        if m.peak_rss_mb is not None:
            out["peak_rss_mb"] = m.peak_rss_mb
        if m.n_params:
            out["n_params"] = float(m.n_params)
        return {k: v for k, v in out.items() if not math.isnan(v)}


def bench_identity(quant_id: str, device: DeviceClass, settings: BenchSettings, nonce: str = "") -> str:
    """Identity of a benchmark result (``nonce`` forces a new measurement of the same inputs)."""
    from tasks.core.identity import code_version, hash_json

    return hash_json(
        {
            "quant": quant_id,
            "device": device.name,
            "runner": {"backend": device.backend, "transport": device.transport},
            "settings": dataclasses.asdict(settings),
            "protocol": code_version("bench-protocol"),
            "nonce": nonce,
        }
    )


def run_benchmark(
    llm: Path, mmproj: Path | None, quant_id: str, quant_type: str, device: DeviceClass,
    settings: BenchSettings, nonce: str = "",
) -> BenchResult:  # fmt: skip
    """Run the protocol for a quantized model on a device class."""
    backend = backend_for(device)
    log.info("benchmarking %s (%s) on %s with %s", llm.name, quant_type, device.name, backend.name)
    measurement = backend.run(llm, mmproj, settings)
    transport = backend.transport if isinstance(backend, BinaryBackend) else LocalTransport()
    return BenchResult(
        identity=bench_identity(quant_id, device, settings, nonce),
        device=device.name, soc=device.soc, backend=backend.name, transport=device.transport,
        runner_host=socket.gethostname(), device_host=transport.host(), quant_id=quant_id,
        quant_type=quant_type, model_size_bytes=llm.stat().st_size, settings=dataclasses.asdict(settings),
        measurement=measurement,
    )  # fmt: skip
