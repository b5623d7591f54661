"""The paper's measurement protocol and the in-process (llama-cpp-python) backend.

``BenchSettings``: the paper's language-model prompt with 400 output tokens, the VLM prompt "What is
in the picture?" with one 336x336 image and 256 output tokens, plus llama-bench's pp512 / tg128
tokens/s over repetitions (mean and stddev).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import platform
import resource
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.ship.llama_cpp import LlamaCpp, LlamaCppError, RuntimeOptions, llama_cpp_build

if TYPE_CHECKING:
    from PIL import Image

LM_PROMPT = "Building a website can be done in 10 simple steps:\nStep 1:"
"""The paper's language-model prompt (MobileVLM, section 5)."""
VLM_QUESTION = "What is in the picture?"
"""The paper's VLM question, asked about one 336x336 image."""
PAPER_IMAGE_SIZE = 336


@dataclass(frozen=True)
class BenchSettings:
    """The measurement protocol (defaults: the paper's, plus llama-bench's pp512 / tg128 x 5)."""

    threads: int = 4
    """CPU threads."""
    lm_tokens: int = 400
    """Output tokens asked for the language-model prompt (EOS ignored, as llama.cpp's --ignore-eos);
    results count the tokens the generator actually returned."""
    vlm_tokens: int = 256
    """Output tokens for the VLM prompt."""
    pp_tokens: int = 512
    """Prompt-processing test length (llama-bench -p)."""
    tg_tokens: int = 128
    """Text-generation test length (llama-bench -n)."""
    repetitions: int = 5
    """Repetitions of each pp / tg test (llama-bench -r)."""
    n_ctx: int = 2048
    """Context length."""
    template: str = "v1"
    """Conversation template wrapping the VLM question (MobileVLM v1 uses Vicuna v1)."""
    gpu_layers: int = 0
    """Layers offloaded to a GPU (Jetson: all)."""
    extra_buffers: bool = False
    """llama.cpp's CPU weight repacking / AMX buffers (see ``RuntimeOptions.extra_buffers``)."""

    def runtime(self, n_ctx: int | None = None) -> RuntimeOptions:
        """Runtime options for this protocol."""
        return RuntimeOptions(
            n_ctx=n_ctx or self.n_ctx, threads=self.threads, gpu_layers=self.gpu_layers,
            extra_buffers=self.extra_buffers,
        )  # fmt: skip


@dataclass
class Phase:
    """One prompt of the protocol: load, prompt processing, generation."""

    load_s: float
    """Model (and mmproj) load time."""
    prompt_tokens: int
    """Prompt tokens (visual tokens included for the VLM)."""
    prompt_tps: float
    """Prompt evaluation speed, tokens/s."""
    eval_tokens: int
    """Generated tokens."""
    eval_tps: float
    """Generation speed, tokens/s."""
    total_s: float
    """Wall time including load (the paper's 'Total')."""
    vision_encode_ms: float | None = None
    """Vision encoder + projector time (VLM only)."""


@dataclass
class Speed:
    """llama-bench style throughput over repetitions."""

    test: str
    """``pp512`` or ``tg128``."""
    mean_tps: float
    """Mean tokens/s."""
    stddev_tps: float
    """Sample standard deviation of tokens/s."""
    samples_tps: list[float]
    """Each repetition."""


@dataclass
class Measurement:
    """What a backend measured on the device."""

    lm: Phase
    """Language-model prompt."""
    vlm: Phase | None
    """VLM prompt (None when the quant has no mmproj)."""
    speeds: list[Speed]
    """pp / tg tests."""
    peak_rss_mb: float | None
    """Peak resident memory of the process that ran the model (None when the device cannot tell)."""
    llama_cpp: str
    """llama.cpp build that ran."""
    n_params: int | None = None
    """Language-model parameters (when the backend can tell)."""


def protocol_image(size: int = PAPER_IMAGE_SIZE) -> Image.Image:
    """The benchmark picture: a deterministic 336x336 scene of coloured shapes."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (235, 235, 225))
    draw = ImageDraw.Draw(image)
    draw.rectangle([size // 8, size // 8, size // 2, size // 2], fill=(200, 40, 40))
    draw.ellipse([size // 2, size // 3, 7 * size // 8, 5 * size // 6], fill=(40, 90, 200))
    return image


def vlm_prompt(template: str) -> str:
    """The VLM question in the model's conversation template, ``<image>`` marking the picture."""
    from model.conversation import build_prompt

    return build_prompt(VLM_QUESTION, template, with_image=True)


def _tps(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else float("nan")


def speed(test: str, tokens: int, seconds: Sequence[float]) -> Speed:
    """Tokens/s statistics of repetitions that each processed ``tokens`` tokens."""
    samples = [_tps(tokens, s) for s in seconds]
    spread = statistics.stdev(samples) if len(samples) > 1 else 0.0
    return Speed(test, statistics.fmean(samples), spread, samples)


def peak_rss_mb() -> float:
    """Peak resident set size of this process's memory image in MB.

    On Linux the high-water mark of the current image (``VmHWM``): ``ru_maxrss`` would also count the
    parent's memory that a freshly spawned child had before its exec. Elsewhere ``ru_maxrss`` (macOS
    reports bytes)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value / (1 << 20) if platform.system() == "Darwin" else value / 1024


@dataclass
class PythonBackend:
    """The protocol through llama-cpp-python (host-cpu runners, CUDA builds on boards)."""

    isolated: bool = True
    """Run the protocol in a fresh child process, so that ``peak_rss_mb`` is the benchmark's own peak and
    not the runner's lifetime peak (a retrain's training stages run in the runner's process); False
    measures in this process (tests that patch the runtime)."""
    name: str = "llama-cpp-python"
    """Backend name in results."""

    def run(self, llm: Path, mmproj: Path | None, settings: BenchSettings) -> Measurement:
        """Measure ``llm`` (and the VLM prompt when ``mmproj`` is given)."""
        if not self.isolated:
            return self.measure(llm, mmproj, settings)

        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            try:
                return pool.submit(_measure_alone, llm, mmproj, settings).result()
            except BrokenProcessPool as err:
                raise LlamaCppError(
                    f"the benchmark process for {llm.name} died (killed for memory, or llama.cpp crashed); "
                    "llama.cpp's own output is on this runner's stderr"
                ) from err

    def measure(self, llm: Path, mmproj: Path | None, settings: BenchSettings) -> Measurement:
        """The protocol in this process; peak RSS is this process's lifetime peak."""
        lm = self.lm_phase(llm, settings)
        vlm = self.vlm_phase(llm, mmproj, settings) if mmproj else None
        speeds, n_params = self.bench(llm, settings)
        return Measurement(lm, vlm, speeds, peak_rss_mb(), llama_cpp_build(), n_params)

    def lm_phase(self, llm: Path, settings: BenchSettings) -> Phase:
        """The language-model prompt with ``lm_tokens`` output tokens."""
        start = time.perf_counter()
        with LlamaCpp(llm, settings.runtime()) as runtime:
            prompt = runtime.tokenize(LM_PROMPT)
            prompt_s = _timed(lambda: runtime.decode(prompt))
            out: list[int] = []
            eval_s = _timed(lambda: out.extend(runtime.greedy(settings.lm_tokens, stop_at_eos=False)))
            load_s = runtime.load_s
        total = time.perf_counter() - start
        return Phase(load_s, len(prompt), _tps(len(prompt), prompt_s), len(out), _tps(len(out), eval_s),
                     total)  # fmt: skip

    def vlm_phase(self, llm: Path, mmproj: Path, settings: BenchSettings) -> Phase:
        """The VLM question about one 336x336 image with ``vlm_tokens`` output tokens."""
        prompt, picture = vlm_prompt(settings.template), protocol_image()
        start = time.perf_counter()
        with LlamaCpp(llm, settings.runtime(), mmproj) as runtime:
            before = time.perf_counter()
            image = runtime.eval_with_image(prompt, picture)
            prompt_s = time.perf_counter() - before - image.encode_ms / 1000
            out: list[int] = []
            eval_s = _timed(lambda: out.extend(runtime.greedy(settings.vlm_tokens, stop_at_eos=False)))
            load_s = runtime.load_s
        total = time.perf_counter() - start
        n_prompt = len(image.text_tokens) + image.image_tokens
        return Phase(load_s, n_prompt, _tps(n_prompt, prompt_s), len(out), _tps(len(out), eval_s), total,
                     image.encode_ms)  # fmt: skip

    def bench(self, llm: Path, settings: BenchSettings) -> tuple[list[Speed], int]:
        """pp / tg throughput like llama-bench: random tokens, a warm-up, ``repetitions`` timed runs."""
        n_ctx = max(settings.pp_tokens, settings.tg_tokens) + 8
        with LlamaCpp(
            llm, dataclasses.replace(settings.runtime(n_ctx), n_batch=settings.pp_tokens)
        ) as runtime:
            rng = np.random.default_rng(0)
            tokens = rng.integers(3, runtime.n_vocab, settings.pp_tokens).tolist()
            _timed(lambda: (runtime.reset(), runtime.decode(tokens[:16])))
            pp = [
                _timed(lambda: (runtime.reset(), runtime.decode(tokens))) for _ in range(settings.repetitions)
            ]
            tg_input = rng.integers(3, runtime.n_vocab, settings.tg_tokens).tolist()
            tg = [_timed(lambda: _generate(runtime, tg_input)) for _ in range(settings.repetitions)]
            n_params = int(runtime.ll.llama_model_n_params(runtime.model))
        return [  # the counts are the lengths of what was decoded
            speed(f"pp{settings.pp_tokens}", len(tokens), pp),
            speed(f"tg{settings.tg_tokens}", len(tg_input), tg),
        ], n_params


def _measure_alone(llm: Path, mmproj: Path | None, settings: BenchSettings) -> Measurement:
    """Entry point of the benchmark's child process."""
    return PythonBackend(isolated=False).measure(llm, mmproj, settings)


def _timed(action: Any) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def _generate(runtime: LlamaCpp, tokens: Sequence[int]) -> None:
    """llama-bench's tg test: decode ``tokens`` one at a time into an empty context."""
    runtime.reset()
    for token in tokens:
        runtime.decode([token])
