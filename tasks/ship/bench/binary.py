"""llama.cpp programs on the device: ``llama-completion``, ``llama-mtmd-cli``, ``llama-bench``.

The binary backend runs them through a transport and parses what they print.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.ship.bench.protocol import (
    LM_PROMPT,
    VLM_QUESTION,
    BenchSettings,
    Measurement,
    Phase,
    Speed,
    _tps,
    protocol_image,
)
from tasks.ship.bench.transports import CommandResult, TransportError, _checked

log = logging.getLogger(__name__)

_PERF_LINE = re.compile(
    r"(?P<what>load|prompt eval|eval|total) time =\s*(?P<ms>[\d.]+) ms(?: /\s*(?P<n>\d+) (?:tokens|runs))?"
)
_ENCODE_LINE = re.compile(r"(?:mtmd batch encoding done in|image slice encoded in) (?P<ms>\d+) ms")
MEDIA_MARKER = "<__media__>"  # mtmd_default_marker(): where llama-mtmd-cli puts the image
_RSS_LINE = re.compile(r"Maximum resident set size \(kbytes\): (?P<kb>\d+)")


def parse_perf(text: str) -> dict[str, float]:
    """llama.cpp's perf summary (``*_perf_print``): load/prompt/eval/total ms and token counts."""
    keys = {"load": "load", "prompt eval": "prompt", "eval": "eval", "total": "total"}
    out: dict[str, float] = {}
    for match in _PERF_LINE.finditer(text):
        key = keys[match["what"]]
        out[f"{key}_ms"] = float(match["ms"])
        if match["n"] is not None:
            out[f"{key}_tokens"] = float(match["n"])
    return out


def parse_encode_ms(text: str) -> float | None:
    """Vision encoding time printed by llama-mtmd-cli (summed over image slices)."""
    times = [float(m["ms"]) for m in _ENCODE_LINE.finditer(text)]
    return sum(times) if times else None


def parse_peak_rss_mb(text: str) -> float | None:
    """Peak RSS from GNU ``time -v`` output, when the device has it."""
    match = _RSS_LINE.search(text)
    return int(match["kb"]) / 1024 if match else None


def parse_llama_bench(text: str) -> list[Speed]:
    """pp / tg entries of ``llama-bench -o json``."""
    start = text.find("[")
    if start < 0:
        raise TransportError(f"llama-bench printed no JSON: {text[-400:]}")
    entries = json.loads(text[start:])
    speeds = []
    for entry in entries:
        test = f"pp{entry['n_prompt']}" if entry["n_prompt"] else f"tg{entry['n_gen']}"
        speeds.append(Speed(test, float(entry["avg_ts"]), float(entry["stddev_ts"]),
                            [float(x) for x in entry.get("samples_ts", [])]))  # fmt: skip
    return speeds


def phase_from_perf(perf: dict[str, float], wall_s: float, encode_ms: float | None = None) -> Phase:
    """A protocol phase from llama.cpp's perf summary (``wall_s``: the command's wall time)."""
    prompt_tokens = int(perf.get("prompt_tokens", 0))
    eval_tokens = int(perf.get("eval_tokens", 0))
    return Phase(
        load_s=perf.get("load_ms", 0.0) / 1000,
        prompt_tokens=prompt_tokens,
        prompt_tps=_tps(prompt_tokens, perf.get("prompt_ms", 0.0) / 1000),
        eval_tokens=eval_tokens,
        eval_tps=_tps(eval_tokens, perf.get("eval_ms", 0.0) / 1000),
        total_s=wall_s,
        vision_encode_ms=encode_ms,
    )


@dataclass
class BinaryBackend:
    """llama.cpp's own programs on the device: llama-completion, llama-mtmd-cli, llama-bench."""

    transport: Any
    """Where they run (local, adb, ssh)."""
    bin_dir: str
    """Folder of the llama.cpp binaries on the device."""
    work_dir: str
    """Folder on the device for the model files and the picture."""
    time_v: bool = True
    """Wrap runs in ``/usr/bin/time -v`` for peak RSS (Linux boards; not on stock Android)."""
    lib_dir: str | None = None
    """``LD_LIBRARY_PATH`` for shared-library builds (Android does not honour the binaries' RPATH)."""
    timeout_s: float = 3600.0
    """Limit for one program run."""
    perf_attempts: int = 3
    """Runs of a program whose perf summary went missing before the benchmark fails."""
    name: str = "llama.cpp-binary"
    """Backend name in results."""

    def run(self, llm: Path, mmproj: Path | None, settings: BenchSettings) -> Measurement:
        """Copy the files to the device, run the three programs, parse what they print."""
        model = self._push(llm)
        lm, rss = self.completion_phase(model, settings)
        vlm = self._mtmd(model, self._push(mmproj), settings) if mmproj else None
        speeds = parse_llama_bench(self._program("llama-bench", self._bench_args(model, settings)).stdout)
        return Measurement(lm, vlm, speeds, rss, self.build())

    def _push(self, local: Path) -> str:
        remote = f"{self.work_dir}/{local.name}"
        self.transport.push(local, remote)
        return remote

    def _argv(self, program: str, args: list[str], timed: bool) -> list[str]:
        argv = [f"{self.bin_dir}/{program}", *args]
        if timed and self.time_v:
            argv = ["/usr/bin/time", "-v", *argv]
        return ["env", f"LD_LIBRARY_PATH={self.lib_dir}", *argv] if self.lib_dir else argv

    def _program(self, program: str, args: list[str]) -> CommandResult:
        return _checked(self.transport.run(self._argv(program, args, True), self.timeout_s), program)

    def _common(self, model: str, settings: BenchSettings) -> list[str]:
        return ["-m", model, "-t", str(settings.threads), "-c", str(settings.n_ctx), "-ngl",
                str(settings.gpu_layers), "--temp", "0", "--ignore-eos", "-lv", "4"]  # fmt: skip

    def completion_phase(self, model: str, settings: BenchSettings) -> tuple[Phase, float | None]:
        """The language-model prompt through llama-completion (and the peak RSS ``time -v`` saw)."""
        args = [*self._common(model, settings), "-no-cnv", "-p", LM_PROMPT, "-n", str(settings.lm_tokens)]
        result, wall = self._timed_with_perf("llama-completion", args)
        return phase_from_perf(parse_perf(result.stderr), wall), parse_peak_rss_mb(result.stderr)

    def _mtmd(self, model: str, mmproj: str, settings: BenchSettings) -> Phase:
        image = self._push(Path(self._picture()))
        args = [*self._common(model, settings), "--mmproj", mmproj, "--image", image,
                *self.vlm_prompt_args(settings), "-n", str(settings.vlm_tokens)]  # fmt: skip
        result, wall = self._timed_with_perf("llama-mtmd-cli", args)
        return phase_from_perf(parse_perf(result.stderr), wall, parse_encode_ms(result.stderr))

    def _timed_with_perf(self, program: str, args: list[str]) -> tuple[CommandResult, float]:
        """Run ``program`` until its perf summary is in its output. llama.cpp's logger writes from a
        thread that the programs do not wait for at exit (llama.cpp issue 22142), so a run can end
        without its last log lines; it is run again, up to ``perf_attempts`` times."""
        for attempt in range(1, self.perf_attempts + 1):
            start = time.perf_counter()
            result = self._program(program, args)
            wall = time.perf_counter() - start
            perf = parse_perf(result.stderr)
            if "prompt_tokens" in perf and "eval_tokens" in perf:
                return result, wall
            log.debug("%s output without a perf summary:\n%s", program, result.stderr[-4000:])
            log.warning("%s printed no perf summary (run %d of %d); running it again", program, attempt,
                        self.perf_attempts)  # fmt: skip
        raise TransportError(
            f"{program} ran {self.perf_attempts} times without printing its perf summary (the "
            "'prompt eval time' and 'eval time' lines); its output is in the log. Check that the "
            "device's llama.cpp prints them at -lv 4"
        )

    def vlm_prompt_args(self, settings: BenchSettings) -> list[str]:
        """The in-process backend's prompt for llama-mtmd-cli: the question after the media marker as the
        user message, rendered by a Jinja chat template of the recipe's conversation template, so both
        backends time the same tokens (llama-mtmd-cli takes the template's text, not a file)."""
        from model.conversation import jinja_chat_template

        template = jinja_chat_template(settings.template)
        return ["--jinja", "--chat-template", template, "-p", f"{MEDIA_MARKER}\n{VLM_QUESTION}"]

    def _picture(self) -> str:

        path = Path(tempfile.gettempdir()) / "mvlm-bench-336.png"
        if not path.is_file():
            protocol_image().save(path)
        return str(path)

    def _bench_args(self, model: str, settings: BenchSettings) -> list[str]:
        return ["-m", model, "-t", str(settings.threads), "-p", str(settings.pp_tokens), "-n",
                str(settings.tg_tokens), "-r", str(settings.repetitions), "-ngl", str(settings.gpu_layers),
                "-o",
                "json"]  # fmt: skip

    def build(self) -> str:
        """The device binaries' build (``llama-bench --version``)."""
        result = self.transport.run(self._argv("llama-bench", ["--version"], False), 120)
        text = (result.stdout + result.stderr).strip().splitlines()
        return f"llama.cpp {text[0]}" if text else "llama.cpp (unknown build)"
