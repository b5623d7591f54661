"""Device benchmarks: llama.cpp runtime, the paper's protocol, backends and transports.

* ``LlamaCpp``: a small wrapper over llama-cpp-python's low-level API (model, context, batches,
  greedy decoding, the mtmd multimodal library). Export and quantization checks use it too.
* The protocol (``BenchSettings``): the paper's language-model prompt with 400 output tokens, the
  VLM prompt "What is in the picture?" with one 336x336 image and 256 output tokens, plus
  llama-bench's pp512 / tg128 tokens/s over repetitions (mean and stddev).
* Backends: ``python`` runs the protocol in this process through llama-cpp-python; ``binary``
  runs llama.cpp's own programs (``llama-completion``, ``llama-mtmd-cli``, ``llama-bench``) on the
  device through a transport: ``local`` (subprocess), ``adb`` (Android phones) or ``ssh`` (boards),
  and parses what they print.

Modules: ``runtime`` (llama.cpp runtime), ``protocol`` (the protocol, python backend), ``transports``,
``binary`` (llama.cpp programs on the device), ``devices`` (device classes / work pools), ``results``
and ``report``. Everything is re-exported here: ``from tasks.ship.bench import X`` works for all of them.
"""

from tasks.ship.bench.binary import (
    BinaryBackend,
    parse_encode_ms,
    parse_llama_bench,
    parse_peak_rss_mb,
    parse_perf,
    phase_from_perf,
)
from tasks.ship.bench.devices import (
    POOLS_FILE,
    DeviceClass,
    SshTarget,
    backend_for,
    device_class,
    load_pools,
    settings_for,
    transport_for,
)
from tasks.ship.bench.protocol import (
    LM_PROMPT,
    PAPER_IMAGE_SIZE,
    VLM_QUESTION,
    BenchSettings,
    Measurement,
    Phase,
    PythonBackend,
    Speed,
    peak_rss_mb,
    protocol_image,
    speed,
    vlm_prompt,
)
from tasks.ship.bench.report import PAPER_RESULTS, REPORT_COLUMNS, report_groups, write_chart
from tasks.ship.bench.results import BenchResult, bench_identity, run_benchmark
from tasks.ship.bench.transports import (
    AdbTransport,
    CommandResult,
    LocalTransport,
    SshTransport,
    Transport,
    TransportError,
)
from tasks.ship.llama_cpp import (
    ImageEval,
    LlamaCpp,
    LlamaCppError,
    RuntimeOptions,
    _route_native_logs,
    llama_cpp_build,
)

__all__ = [
    "LM_PROMPT",
    "PAPER_IMAGE_SIZE",
    "PAPER_RESULTS",
    "POOLS_FILE",
    "REPORT_COLUMNS",
    "VLM_QUESTION",
    "AdbTransport",
    "BenchResult",
    "BenchSettings",
    "BinaryBackend",
    "CommandResult",
    "DeviceClass",
    "ImageEval",
    "LlamaCpp",
    "LlamaCppError",
    "LocalTransport",
    "Measurement",
    "Phase",
    "PythonBackend",
    "RuntimeOptions",
    "Speed",
    "SshTarget",
    "SshTransport",
    "Transport",
    "TransportError",
    "_route_native_logs",
    "backend_for",
    "bench_identity",
    "device_class",
    "llama_cpp_build",
    "load_pools",
    "parse_encode_ms",
    "parse_llama_bench",
    "parse_peak_rss_mb",
    "parse_perf",
    "peak_rss_mb",
    "phase_from_perf",
    "protocol_image",
    "report_groups",
    "run_benchmark",
    "settings_for",
    "speed",
    "transport_for",
    "vlm_prompt",
    "write_chart",
]
