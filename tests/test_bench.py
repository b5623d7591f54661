"""Benchmark protocol, backends, transports and device classes.

The python backend and the local transport run for real on this CPU; the ssh transport runs against
a real sshd on 127.0.0.1 (skipped where openssh-server is missing); the llama.cpp-binary backend
runs llama.cpp's programs built by ``make llama-cpp-programs`` (or ``MVLM_LLAMACPP_BIN``). There is
no phone here: the adb transport is tested through its command lines and by parsing output recorded
from the same llama.cpp programs (build 0c1e570, the llama.cpp that llama-cpp-python 0.3.36 vendors)
on this host.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tasks.ship.bench import (
    AdbTransport,
    BenchSettings,
    BinaryBackend,
    LocalTransport,
    PythonBackend,
    SshTransport,
    backend_for,
    bench_identity,
    device_class,
    load_pools,
    parse_encode_ms,
    parse_llama_bench,
    parse_peak_rss_mb,
    parse_perf,
    phase_from_perf,
    run_benchmark,
    settings_for,
)

pytest_plugins = ("export_fixtures",)
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Recorded on this host from llama.cpp 0c1e570 (stderr of llama-completion -lv 4, llama-mtmd-cli -lv 4).
RECORDED_COMPLETION = """\
0.00.017.230 I common_perf_print:    samplers time =       0.15 ms /    66 tokens
0.00.017.237 I common_perf_print:        load time =       4.30 ms
0.00.017.243 I common_perf_print: prompt eval time =       1.02 ms /    46 tokens (    0.02 ms per token, 45275.59 tokens per second)
0.00.017.249 I common_perf_print:        eval time =       2.78 ms /    19 runs   (    0.15 ms per token,  6841.92 tokens per second)
0.00.017.253 I common_perf_print:       total time =       5.36 ms /    65 tokens
0.00.017.258 I common_perf_print: unaccounted time =       1.38 ms /  25.8 %      (total - sampling - prompt eval - eval) / (total)
"""  # noqa: E501
RECORDED_MTMD = """\
0.00.757.877 I mtmd batch encoding done in 340 ms
0.00.894.998 I image decoded (batch 1/1) in 137 ms
0.00.897.941 I llama_perf_context_print:        load time =     222.66 ms
0.00.897.954 I llama_perf_context_print: prompt eval time =     656.89 ms /   157 tokens (    4.18 ms per token,   239.00 tokens per second)
0.00.897.955 I llama_perf_context_print:        eval time =       1.57 ms /    19 runs   (    0.08 ms per token, 12101.91 tokens per second)
0.00.897.956 I llama_perf_context_print:       total time =     668.03 ms /   176 tokens
\tMaximum resident set size (kbytes): 51200
"""  # noqa: E501
RECORDED_LLAMA_BENCH = (
    '[{"build_commit": "0c1e570", "model_size": 1089536, "model_n_params": 1869056, "n_threads": 1, '
    '"n_prompt": 16, "n_gen": 0, "avg_ts": 25112.466617, "stddev_ts": 2047.722337, '
    '"samples_ts": [23664.5, 26560.4]}, '
    '{"build_commit": "0c1e570", "model_size": 1089536, "model_n_params": 1869056, "n_threads": 1, '
    '"n_prompt": 0, "n_gen": 4, "avg_ts": 12242.482141, "stddev_ts": 1568.817067, '
    '"samples_ts": [11133.2, 13351.8]}]'
)
QUICK = {"lm_tokens": 24, "vlm_tokens": 12, "pp_tokens": 64, "tg_tokens": 16, "repetitions": 2, "threads": 1}


def test_pools_file_defines_the_paper_devices() -> None:
    pools = load_pools()
    assert {"host-cpu", "snapdragon-888", "jetson-orin"} <= set(pools)
    assert (pools["host-cpu"].backend, pools["host-cpu"].transport) == ("python", "local")
    assert (pools["snapdragon-888"].backend, pools["snapdragon-888"].transport) == ("binary", "adb")
    assert pools["jetson-orin"].gpu_layers > 0


def test_invalid_pool_names_file_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "pools.yaml"
    bad.write_text(
        "pools:\n  phone:\n    description: x\n    soc: y\n    backend: binary\n    transport: adb\n"
    )
    with pytest.raises(ValueError, match=r"(?s)pools\.yaml: pool 'phone' is invalid.*bin_dir"):
        load_pools(bad)
    with pytest.raises(KeyError, match="unknown pool 'nope'"):
        device_class("nope")
    with pytest.raises(ValueError, match="unknown benchmark setting"):
        settings_for(device_class("host-cpu"), {"tokens": 3})


def test_python_backend_runs_the_paper_protocol(tiny_quant) -> None:
    device = device_class("host-cpu")
    settings = settings_for(device, {"threads": 1, "repetitions": 3})
    result = run_benchmark(tiny_quant.llm, tiny_quant.mmproj, tiny_quant.quant_id, "q4_0", device, settings)
    m, metrics = result.measurement, result.metrics()
    print({k: round(v, 2) for k, v in metrics.items()})
    assert m.lm.eval_tokens == 400 and m.vlm is not None and m.vlm.eval_tokens == 256
    assert m.vlm.prompt_tokens > 144 and m.vlm.vision_encode_ms and m.vlm.vision_encode_ms > 0
    assert [s.test for s in m.speeds] == ["pp512", "tg128"] and all(len(s.samples_tps) == 3 for s in m.speeds)
    assert m.lm.total_s >= m.lm.load_s and m.peak_rss_mb and m.peak_rss_mb > 0
    assert metrics["model_size_gb"] == tiny_quant.llm.stat().st_size / 1e9
    assert {"lm.eval_tps", "lm.prompt_tps", "vlm.eval_tps", "pp512.mean_tps", "tg128.stddev_tps"} <= set(
        metrics
    )


def test_python_backend_counts_what_the_generator_returned(
    tiny_quant, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A generator that stops early (at a quarter, after 0.2 s) is reported as such, not at full speed."""
    import time

    from tasks.ship.bench.protocol import BenchSettings, PythonBackend
    from tasks.ship.llama_cpp import LlamaCpp

    real = LlamaCpp.greedy

    def early(self: LlamaCpp, n_tokens: int, stop_at_eos: bool = True) -> list[int]:
        time.sleep(0.2)
        return real(self, n_tokens // 4, stop_at_eos)

    monkeypatch.setattr(LlamaCpp, "greedy", early)
    settings = BenchSettings(**QUICK)
    m = PythonBackend(isolated=False).run(tiny_quant.llm, tiny_quant.mmproj, settings)
    assert (
        m.lm.eval_tokens == QUICK["lm_tokens"] // 4
        and m.vlm
        and m.vlm.eval_tokens == QUICK["vlm_tokens"] // 4
    )
    assert (
        m.lm.eval_tps <= (QUICK["lm_tokens"] // 4) / 0.2
        and m.vlm.eval_tps <= (QUICK["vlm_tokens"] // 4) / 0.2
    )
    assert [len(s.samples_tps) for s in m.speeds] == [2, 2]


@pytest.mark.slow
def test_peak_rss_is_the_benchmarks_own_and_grows_with_the_model(
    tmp_path: Path, tiny_tokenizer, tiny_quant
) -> None:
    """The runner's process has already peaked far higher (a retrain trains in it): the benchmark
    reports the peak of its own process, which grows with the model it ran."""
    import numpy as np

    import model
    from tasks.ship.bench.protocol import PythonBackend, peak_rss_mb
    from tasks.ship.export import ExportConfig, export_checkpoint

    ballast = np.ones(800 << 20, dtype=np.uint8)  # 800 MB written in the runner's process
    runner_peak = peak_rss_mb()
    del ballast
    shape = {"n_layer": 8, "hidden": 512, "n_head": 8, "intermediate": 1408}
    big = model.build("mobilevlm-tiny-256-336", vocab_size=len(tiny_tokenizer), **shape)
    model.save(big, tmp_path / "ckpt", tokenizer=tiny_tokenizer)
    export = export_checkpoint(tmp_path / "ckpt", tmp_path / "out", ExportConfig("f32", "f32"))
    settings = BenchSettings(**QUICK)
    small = PythonBackend().run(tiny_quant.llm, None, settings).peak_rss_mb
    large = PythonBackend().run(export.llm, None, settings).peak_rss_mb
    grown = (export.llm.stat().st_size - tiny_quant.llm.stat().st_size) / 2**20
    print(f"runner peak {runner_peak:.0f} MB; bench peak {small:.0f} MB (tiny q4_0), {large:.0f} MB "
          f"(+{grown:.0f} MB of f32 weights)")  # fmt: skip
    assert small is not None and large is not None
    assert small < runner_peak - 600
    assert large - small > 0.8 * grown


def test_identity_follows_inputs() -> None:
    host, phone = device_class("host-cpu"), device_class("snapdragon-888")
    base = bench_identity("q", host, BenchSettings())
    assert base == bench_identity("q", host, BenchSettings())
    assert base != bench_identity("q", phone, BenchSettings())
    assert base != bench_identity("q", host, dataclasses.replace(BenchSettings(), threads=8))
    assert base != bench_identity("q", host, BenchSettings(), nonce="again")


def test_parse_recorded_llama_cpp_output() -> None:
    perf = parse_perf(RECORDED_COMPLETION)
    assert perf == {
        "load_ms": 4.30, "prompt_ms": 1.02, "prompt_tokens": 46.0, "eval_ms": 2.78, "eval_tokens": 19.0,
        "total_ms": 5.36, "total_tokens": 65.0,
    }  # fmt: skip
    phase = phase_from_perf(parse_perf(RECORDED_MTMD), 1.5, parse_encode_ms(RECORDED_MTMD))
    assert phase.prompt_tokens == 157 and phase.eval_tokens == 19 and phase.vision_encode_ms == 340
    assert phase.prompt_tps == pytest.approx(157 / 0.65689) and phase.total_s == 1.5
    assert parse_peak_rss_mb(RECORDED_MTMD) == 50.0
    speeds = parse_llama_bench("log line\n" + RECORDED_LLAMA_BENCH)
    assert [(s.test, round(s.mean_tps), len(s.samples_tps)) for s in speeds] == [
        ("pp16", 25112, 2),
        ("tg4", 12242, 2),
    ]


def test_a_run_whose_perf_lines_were_lost_is_run_again() -> None:
    """llama.cpp's logger thread can lose a program's last lines at exit (seen here about one run in
    twenty): the run is repeated, and a program that never prints them fails, named."""
    from tasks.ship.bench.transports import CommandResult, TransportError

    class Device:
        def __init__(self, outputs: list[str]) -> None:
            self.outputs, self.runs = outputs, 0

        def run(self, argv: list[str], timeout_s: float) -> CommandResult:
            self.runs += 1
            return CommandResult(argv, 0, "", self.outputs[min(self.runs, len(self.outputs)) - 1])

    cut_short = "0.00.018.773 I cmn  common_init_: warming up the model with an empty run\n"
    device = Device([cut_short, RECORDED_COMPLETION])
    phase, _ = BinaryBackend(device, "/bin", "/dev").completion_phase("m.gguf", BenchSettings())
    assert device.runs == 2 and (phase.prompt_tokens, phase.eval_tokens) == (46, 19)
    never = Device([cut_short])
    with pytest.raises(
        TransportError, match="llama-completion ran 3 times without printing its perf summary"
    ):
        BinaryBackend(never, "/bin", "/dev").completion_phase("m.gguf", BenchSettings())
    assert never.runs == 3


def test_adb_transport_command_lines() -> None:
    adb = AdbTransport(serial="R5CT1234")
    prompt = "Building a website can be done in 10 simple steps:\nStep 1:"
    argv = ["/data/local/tmp/llama.cpp/bin/llama-completion", "-p", prompt]
    command = adb.command(argv)
    assert command[:4] == ["adb", "-s", "R5CT1234", "shell"]
    assert command[4] == (
        "/data/local/tmp/llama.cpp/bin/llama-completion -p "
        "'Building a website can be done in 10 simple steps:\nStep 1:'"
    )
    phone = backend_for(device_class("snapdragon-888"))
    assert isinstance(phone, BinaryBackend) and isinstance(phone.transport, AdbTransport)
    assert phone._argv("llama-bench", ["-o", "json"], timed=True) == [
        "env",
        "LD_LIBRARY_PATH=/data/local/tmp/llama.cpp/lib",
        "/data/local/tmp/llama.cpp/bin/llama-bench",
        "-o",
        "json",
    ]  # fmt: skip  (no /usr/bin/time on stock Android)
    ssh = SshTransport("orin.local", user="nvidia", port=2222, identity="/k")
    assert ssh.command(["hostname"]) == [
        "ssh", "-p", "2222", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=accept-new", "-i", "/k",
        "nvidia@orin.local", "hostname",
    ]  # fmt: skip


def _local_ssh(server) -> SshTransport:
    options = ("BatchMode=yes", "StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null")
    return SshTransport("127.0.0.1", "root", server.port, str(server.key), options=options)


def test_ssh_transport_against_local_sshd(ssh_server, tmp_path: Path) -> None:
    ssh = _local_ssh(ssh_server)
    assert ssh.run(["echo", "it's", "here"], 30).stdout.strip() == "it's here"
    payload = tmp_path / "blob.bin"
    payload.write_bytes(bytes(range(256)) * 64)
    remote = str(tmp_path / "remote" / "blob.bin")
    ssh.push(payload, remote)
    assert Path(remote).read_bytes() == payload.read_bytes()
    assert ssh.host()


def _binary_result(backend: BinaryBackend, tiny_quant) -> dict:
    device = device_class("host-cpu").model_copy(update={"name": "host-cpu-binary"})
    settings = settings_for(device, {**QUICK, "n_ctx": 1024})
    measurement = backend.run(tiny_quant.llm, tiny_quant.mmproj, settings)
    assert measurement.lm.eval_tokens >= QUICK["lm_tokens"] - 1 and measurement.lm.prompt_tokens > 5
    assert measurement.vlm is not None and measurement.vlm.prompt_tokens > 144
    assert measurement.vlm.vision_encode_ms is not None
    assert [s.test for s in measurement.speeds] == ["pp64", "tg16"]
    assert measurement.peak_rss_mb and measurement.peak_rss_mb > 1
    assert "0c1e570" in measurement.llama_cpp or "llama.cpp" in measurement.llama_cpp
    # Both backends time the same prompts: the raw text prompt, and the question in the v1 template.
    python = PythonBackend()
    assert measurement.lm.prompt_tokens == python.lm_phase(tiny_quant.llm, settings).prompt_tokens
    in_process = python.vlm_phase(tiny_quant.llm, tiny_quant.mmproj, settings)
    assert measurement.vlm.prompt_tokens == in_process.prompt_tokens
    return dataclasses.asdict(measurement)


def test_llama_mtmd_cli_gets_the_in_process_prompt() -> None:
    """The Jinja template passed with ``--chat-template`` renders the ``-p`` message (media marker,
    newline, question) as the in-process backend's prompt, marker for ``<image>``."""
    import jinja2

    from tasks.ship.bench.binary import MEDIA_MARKER
    from tasks.ship.bench.protocol import vlm_prompt

    settings = BenchSettings()
    args = BinaryBackend(LocalTransport(), "/bin", "/device").vlm_prompt_args(settings)
    assert args[:2] == ["--jinja", "--chat-template"] and args[3] == "-p"
    rendered = jinja2.Template(args[2]).render(
        messages=[{"role": "user", "content": args[4]}], add_generation_prompt=True
    )
    assert rendered == vlm_prompt(settings.template).replace("<image>", MEDIA_MARKER)
    assert rendered.startswith("A chat between a curious user") and rendered.endswith("? ASSISTANT:")


def test_binary_backend_local_transport(llama_cpp_bin: Path, tiny_quant, tmp_path: Path) -> None:
    backend = BinaryBackend(LocalTransport(), str(llama_cpp_bin), str(tmp_path / "device"))
    print(_binary_result(backend, tiny_quant))


@pytest.mark.slow
def test_binary_backend_over_ssh(llama_cpp_bin: Path, ssh_server, tiny_quant, tmp_path: Path) -> None:
    ssh = _local_ssh(ssh_server)
    backend = BinaryBackend(ssh, str(llama_cpp_bin), str(tmp_path / "board"))
    _binary_result(backend, tiny_quant)
    assert (tmp_path / "board" / tiny_quant.llm.name).is_file()


def test_bench_cli_names_what_is_wrong(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    runner = CliRunner()
    done = runner.invoke(app, ["bench", str(tmp_path), "--pool", "pixel-9"])
    assert done.exit_code == 2 and "unknown pool 'pixel-9'" in done.output
    done = runner.invoke(app, ["bench", str(tmp_path), "--pool", "host-cpu"])
    assert done.exit_code == 2 and "neither an MLflow run id nor a quant folder" in done.output
    done = runner.invoke(app, ["bench", str(tmp_path), "--set", "tokens=3"])
    assert done.exit_code == 2 and "expected key=value" in done.output
    done = runner.invoke(app, ["bench", "pools"])
    assert done.exit_code == 0 and "snapdragon-888" in done.output
