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
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import math
import os
import platform
import re
import resource
import shlex
import shutil
import socket
import statistics
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

LM_PROMPT = "Building a website can be done in 10 simple steps:\nStep 1:"
"""The paper's language-model prompt (MobileVLM, section 5)."""
VLM_QUESTION = "What is in the picture?"
"""The paper's VLM question, asked about one 336x336 image."""
PAPER_IMAGE_SIZE = 336

_LOG_CALLBACKS: list[Any] = []  # ctypes callbacks must outlive the C library's use of them


# --- llama.cpp runtime ------------------------------------------------------------------------


def llama_cpp_build() -> str:
    """The llama.cpp build of the installed llama-cpp-python (goes into every bench result)."""
    import llama_cpp

    return f"llama-cpp-python {llama_cpp.__version__} (libllama {llama_cpp.llama_version().decode()})"


def _route_native_logs() -> None:
    """Send llama.cpp / mtmd log lines to Python logging at DEBUG, once per process."""
    import llama_cpp
    from llama_cpp import mtmd_cpp

    if _LOG_CALLBACKS:
        return
    native = logging.getLogger("llama_cpp.native")

    @llama_cpp.llama_log_callback
    def _callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        native.debug("%s", text.decode(errors="replace").rstrip())

    _LOG_CALLBACKS.append(_callback)
    llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))
    mtmd_cpp.mtmd_helper_log_set(_callback, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()


@dataclass(frozen=True)
class RuntimeOptions:
    """How a GGUF is loaded into llama.cpp."""

    n_ctx: int = 2048
    """Context length (tokens) of the KV cache."""
    n_batch: int = 512
    """Tokens per decode call (prompt processing batch)."""
    threads: int = 4
    """CPU threads for generation and prompt processing."""
    f32_kv: bool = False
    """Keep the KV cache in f32 (exact comparisons); llama.cpp's default is f16."""
    gpu_layers: int = 0
    """Layers offloaded to a GPU (0 for CPU builds)."""
    extra_buffers: bool = False
    """llama.cpp's ``use_extra_bufts`` (CPU weight repacking, AMX). Off by default: on AMX hosts where
    the kernel does not grant tile state (our CI sandbox) any batch of 2+ tokens on a q4_0/q8_0 model
    segfaults inside the AMX kernels; turn it on per device in ``infra/runners/pools.yaml``."""


class LlamaCppError(RuntimeError):
    """llama.cpp refused a file or an operation."""


class LlamaCpp:
    """A loaded GGUF language model (optionally with an mmproj) and one llama.cpp context."""

    def __init__(self, model_path: str | Path, options: RuntimeOptions, mmproj: str | Path | None = None):
        import llama_cpp

        _route_native_logs()
        self.ll = llama_cpp
        self.options = options
        start = time.perf_counter()
        self.model = self._load_model(Path(model_path))
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.ctx = self._new_context()
        self.mtmd = self._load_mmproj(Path(mmproj)) if mmproj else None
        self.load_s = time.perf_counter() - start
        self.n_past = 0

    def _load_model(self, path: Path) -> Any:
        if not path.is_file():
            raise LlamaCppError(f"GGUF model {path} does not exist")
        params = self.ll.llama_model_default_params()
        params.n_gpu_layers = self.options.gpu_layers
        params.use_extra_bufts = self.options.extra_buffers
        model = self.ll.llama_model_load_from_file(str(path).encode(), params)
        if not model:
            raise LlamaCppError(f"llama.cpp could not load {path}; run with -v for its log")
        return model

    def _new_context(self) -> Any:
        params = self.ll.llama_context_default_params()
        params.n_ctx = self.options.n_ctx
        params.n_batch = params.n_ubatch = self.options.n_batch
        params.n_threads = params.n_threads_batch = self.options.threads
        params.no_perf = False
        if self.options.f32_kv:  # exact comparisons: f32 cache, no flash attention (it rounds through f16)
            params.type_k = params.type_v = self.ll.GGML_TYPE_F32
            params.flash_attn_type = self.ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
        ctx = self.ll.llama_init_from_model(self.model, params)
        if not ctx:
            raise LlamaCppError("llama.cpp could not create a context (n_ctx too large for memory?)")
        return ctx

    def _load_mmproj(self, path: Path) -> Any:
        from llama_cpp import mtmd_cpp

        if not path.is_file():
            raise LlamaCppError(f"mmproj GGUF {path} does not exist")
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = self.options.gpu_layers > 0
        params.n_threads = self.options.threads
        params.print_timings = False
        params.warmup = True
        ctx = mtmd_cpp.mtmd_init_from_file(str(path).encode(), self.model, params)
        if not ctx:
            raise LlamaCppError(f"llama.cpp's mtmd could not load the mmproj {path}; run with -v for its log")
        return ctx

    def close(self) -> None:
        """Free the mtmd context, the llama context and the model."""
        if self.mtmd:
            from llama_cpp import mtmd_cpp

            mtmd_cpp.mtmd_free(self.mtmd)
            self.mtmd = None
        if self.ctx:
            self.ll.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            self.ll.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> LlamaCpp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- text ---------------------------------------------------------------------------------

    @property
    def n_vocab(self) -> int:
        """Vocabulary size."""
        return self.ll.llama_vocab_n_tokens(self.vocab)

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        """llama.cpp's tokenisation of ``text`` (bos prepended when the model asks for it)."""
        data = text.encode()
        buffer = (self.ll.llama_token * (len(data) + 8))()
        n = self.ll.llama_tokenize(self.vocab, data, len(data), buffer, len(buffer), add_bos, False)
        if n < 0:
            raise LlamaCppError(f"tokenisation needs {-n} tokens, more than the buffer")
        return list(buffer[:n])

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Text of ``tokens`` (special tokens dropped)."""
        array = (self.ll.llama_token * len(tokens))(*tokens)
        size = 8 * len(tokens) + 16
        buffer = ctypes.create_string_buffer(size)
        n = self.ll.llama_detokenize(self.vocab, array, len(tokens), buffer, size, True, False)
        return buffer.raw[: max(n, 0)].decode(errors="replace")

    def reset(self) -> None:
        """Clear the KV cache."""
        self.ll.llama_memory_clear(self.ll.llama_get_memory(self.ctx), True)
        self.n_past = 0

    def decode(self, tokens: Sequence[int], all_logits: bool = False) -> None:
        """Append ``tokens`` to the sequence in batches of ``n_batch``; logits for the last (or all)."""
        step = self.options.n_batch
        for start in range(0, len(tokens), step):
            chunk = tokens[start : start + step]
            last = start + len(chunk) == len(tokens)
            self._decode_batch(chunk, all_logits, last)

    def _decode_batch(self, tokens: Sequence[int], all_logits: bool, last: bool) -> None:
        batch = self.ll.llama_batch_init(len(tokens), 0, 1)
        try:
            for i, token in enumerate(tokens):
                batch.token[i] = token
                batch.pos[i] = self.n_past + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = all_logits or (last and i == len(tokens) - 1)
            batch.n_tokens = len(tokens)
            if self.ll.llama_decode(self.ctx, batch) != 0:
                raise LlamaCppError(
                    f"llama_decode failed at position {self.n_past} (context {self.options.n_ctx})"
                )
            self.n_past += len(tokens)
        finally:
            self.ll.llama_batch_free(batch)

    def logits(self, index: int = -1) -> np.ndarray:
        """A copy of the logits of output ``index`` of the last decode."""
        pointer = self.ll.llama_get_logits_ith(self.ctx, index)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,)).copy()

    def all_logits(self, tokens: Sequence[int]) -> np.ndarray:
        """(len(tokens), vocab) logits of a fresh sequence, one decode per ``n_batch`` tokens."""
        self.reset()
        rows = []
        step = self.options.n_batch
        for start in range(0, len(tokens), step):
            chunk = tokens[start : start + step]
            self._decode_batch(chunk, True, True)
            rows.extend(self.logits(i) for i in range(len(chunk)))
        return np.stack(rows)

    def greedy(self, n_tokens: int, stop_at_eos: bool = True) -> list[int]:
        """Generate up to ``n_tokens`` greedily after the current sequence (exactly n when not stopping)."""
        out: list[int] = []
        for _ in range(n_tokens):
            token = int(np.argmax(self.logits()))
            if stop_at_eos and self.ll.llama_vocab_is_eog(self.vocab, token):
                break
            out.append(token)
            self.decode([token])
        return out

    # --- images ---------------------------------------------------------------------------------

    def eval_with_image(self, prompt: str, image: Image.Image) -> ImageEval:
        """Tokenise ``prompt`` (``<image>`` marks the image) with mtmd, encode the image, decode all."""
        from llama_cpp import mtmd_cpp

        if self.mtmd is None:
            raise LlamaCppError("no mmproj loaded: pass mmproj= to evaluate images")
        chunks = self._mtmd_tokenize(prompt, image)
        try:
            return self._eval_chunks(chunks)
        finally:
            mtmd_cpp.mtmd_input_chunks_free(chunks)

    def eval_segments(self, segments: Sequence[Sequence[int] | Image.Image]) -> ImageEval:
        """Decode token-id segments and images in order (our tokenisation, llama.cpp's image path)."""
        from llama_cpp import mtmd_cpp

        result = ImageEval()
        for segment in segments:
            if isinstance(segment, Sequence):
                self.decode(list(segment))
                result.text_tokens.extend(segment)
                continue
            chunks = self._mtmd_tokenize("<image>", segment, add_special=False)
            try:
                image = self._eval_chunks(chunks)
            finally:
                mtmd_cpp.mtmd_input_chunks_free(chunks)
            result.encode_ms += image.encode_ms
            result.image_tokens += image.image_tokens
        return result

    def _mtmd_tokenize(self, prompt: str, image: Image.Image, add_special: bool = True) -> Any:
        from llama_cpp import mtmd_cpp

        rgb = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
        bitmap = mtmd_cpp.mtmd_bitmap_init(
            rgb.shape[1], rgb.shape[0], rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        )
        text = prompt.replace("<image>", mtmd_cpp.mtmd_default_marker().decode()).encode()
        spec = mtmd_cpp.mtmd_input_text(
            text=text, text_len=len(text), add_special=add_special, parse_special=True
        )
        chunks = mtmd_cpp.mtmd_input_chunks_init()
        bitmaps = (mtmd_cpp.mtmd_bitmap_p_ctypes * 1)(bitmap)
        try:
            code = mtmd_cpp.mtmd_tokenize(self.mtmd, chunks, ctypes.byref(spec), bitmaps, 1)
        finally:
            mtmd_cpp.mtmd_bitmap_free(bitmap)
        if code != 0:
            mtmd_cpp.mtmd_input_chunks_free(chunks)
            raise LlamaCppError(f"mtmd_tokenize failed with code {code} (prompt needs exactly one <image>)")
        return chunks

    def _eval_chunks(self, chunks: Any) -> ImageEval:
        from llama_cpp import mtmd_cpp

        result = ImageEval()
        for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks)):
            chunk = mtmd_cpp.mtmd_input_chunks_get(chunks, i)
            n = mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk)
            if mtmd_cpp.mtmd_input_chunk_get_type(chunk) == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                result.encode_ms += self._encode_and_decode_image(chunk)
                result.image_tokens += n
            else:
                count = ctypes.c_size_t(0)
                pointer = mtmd_cpp.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(count))
                tokens = [pointer[j] for j in range(count.value)]
                self.decode(tokens)
                result.text_tokens.extend(tokens)
        return result

    def _encode_and_decode_image(self, chunk: Any) -> float:
        from llama_cpp import mtmd_cpp

        start = time.perf_counter()
        if mtmd_cpp.mtmd_encode_chunk(self.mtmd, chunk) != 0:
            raise LlamaCppError("mtmd_encode_chunk failed (image encoder)")
        encode_ms = (time.perf_counter() - start) * 1000
        embd = mtmd_cpp.mtmd_get_output_embd(self.mtmd)
        new_past = self.ll.llama_pos(0)
        code = mtmd_cpp.mtmd_helper_decode_image_chunk(
            self.mtmd,
            self.ctx,
            chunk,
            embd,
            self.n_past,
            0,
            self.options.n_batch,
            ctypes.byref(new_past),
            mtmd_cpp.mtmd_helper_post_decode_callback(),
            None,
        )
        if code != 0:
            raise LlamaCppError(f"decoding the image embeddings failed with code {code}")
        self.n_past = new_past.value
        return encode_ms

    def image_embeddings(self, image: Image.Image, n_embd: int) -> np.ndarray:
        """(tokens, n_embd) projector output for ``image`` as llama.cpp computes it."""
        from llama_cpp import mtmd_cpp

        chunks = self._mtmd_tokenize("<image>", image, add_special=False)
        try:
            for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks)):
                chunk = mtmd_cpp.mtmd_input_chunks_get(chunks, i)
                if mtmd_cpp.mtmd_input_chunk_get_type(chunk) == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    n = mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk)
                    if mtmd_cpp.mtmd_encode_chunk(self.mtmd, chunk) != 0:
                        raise LlamaCppError("mtmd_encode_chunk failed (image encoder)")
                    embd = mtmd_cpp.mtmd_get_output_embd(self.mtmd)
                    return np.ctypeslib.as_array(embd, shape=(n * n_embd,)).reshape(n, n_embd).copy()
        finally:
            mtmd_cpp.mtmd_input_chunks_free(chunks)
        raise LlamaCppError("mtmd produced no image chunk")


@dataclass
class ImageEval:
    """What evaluating a prompt with an image did."""

    encode_ms: float = 0.0
    """Vision encoder + projector time."""
    image_tokens: int = 0
    """Visual tokens decoded into the language model."""
    text_tokens: list[int] = field(default_factory=list)
    """Text tokens of the prompt (llama.cpp's tokenisation)."""


# --- the protocol -----------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchSettings:
    """The measurement protocol (defaults: the paper's, plus llama-bench's pp512 / tg128 x 5)."""

    threads: int = 4
    """CPU threads."""
    lm_tokens: int = 400
    """Output tokens for the language-model prompt (EOS ignored, as llama.cpp's --ignore-eos)."""
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
    """Peak resident set size of this process in MB (Linux reports kB, macOS bytes)."""
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value / (1 << 20) if platform.system() == "Darwin" else value / 1024


class PythonBackend:
    """The protocol through llama-cpp-python in this process (host-cpu runners, CUDA builds on boards)."""

    name = "llama-cpp-python"

    def run(self, llm: Path, mmproj: Path | None, settings: BenchSettings) -> Measurement:
        """Measure ``llm`` (and the VLM prompt when ``mmproj`` is given)."""
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
            eval_s = _timed(lambda: runtime.greedy(settings.lm_tokens, stop_at_eos=False))
            load_s = runtime.load_s
        total = time.perf_counter() - start
        return Phase(load_s, len(prompt), _tps(len(prompt), prompt_s), settings.lm_tokens,
                     _tps(settings.lm_tokens, eval_s), total)  # fmt: skip

    def vlm_phase(self, llm: Path, mmproj: Path, settings: BenchSettings) -> Phase:
        """The VLM question about one 336x336 image with ``vlm_tokens`` output tokens."""
        prompt, picture = vlm_prompt(settings.template), protocol_image()
        start = time.perf_counter()
        with LlamaCpp(llm, settings.runtime(), mmproj) as runtime:
            before = time.perf_counter()
            image = runtime.eval_with_image(prompt, picture)
            prompt_s = time.perf_counter() - before - image.encode_ms / 1000
            eval_s = _timed(lambda: runtime.greedy(settings.vlm_tokens, stop_at_eos=False))
            load_s = runtime.load_s
        total = time.perf_counter() - start
        n_prompt = len(image.text_tokens) + image.image_tokens
        return Phase(load_s, n_prompt, _tps(n_prompt, prompt_s), settings.vlm_tokens,
                     _tps(settings.vlm_tokens, eval_s), total, image.encode_ms)  # fmt: skip

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
            tg = [
                _timed(lambda: _generate(runtime, tokens[: settings.tg_tokens]))
                for _ in range(settings.repetitions)
            ]
            n_params = int(runtime.ll.llama_model_n_params(runtime.model))
        return [
            speed(f"pp{settings.pp_tokens}", settings.pp_tokens, pp),
            speed(f"tg{settings.tg_tokens}", settings.tg_tokens, tg),
        ], n_params


def _timed(action: Any) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def _generate(runtime: LlamaCpp, tokens: Sequence[int]) -> None:
    """llama-bench's tg test: decode ``tokens`` one at a time into an empty context."""
    runtime.reset()
    for token in tokens:
        runtime.decode([token])


# --- transports -------------------------------------------------------------------------------


@dataclass
class CommandResult:
    """A command run on the device."""

    argv: list[str]
    """What ran (as the host invoked it)."""
    returncode: int
    """Exit status."""
    stdout: str
    """Standard output."""
    stderr: str
    """Standard error (llama.cpp logs here)."""


class TransportError(RuntimeError):
    """A command or a copy on the device failed."""


class Transport(Protocol):
    """How the runner reaches the device."""

    name: str

    def run(self, argv: Sequence[str], timeout: float) -> CommandResult:
        """Run ``argv`` on the device."""
        ...

    def push(self, local: Path, remote: str) -> None:
        """Copy a file to the device."""
        ...

    def host(self) -> str:
        """A name for the device in results."""
        ...


def _run(argv: list[str], timeout: float) -> CommandResult:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as err:
        raise TransportError(f"{argv[0]} is not installed on the runner: {err}") from err
    except subprocess.TimeoutExpired as err:
        raise TransportError(f"{shlex.join(argv)} ran past {timeout:.0f}s") from err
    return CommandResult(argv, done.returncode, done.stdout, done.stderr)


def _checked(result: CommandResult, what: str) -> CommandResult:
    if result.returncode != 0:
        raise TransportError(f"{what} failed (exit {result.returncode}): {result.stderr.strip()[-800:]}")
    return result


class LocalTransport:
    """The device is the runner's own machine (host-cpu, a Jetson running its own worker)."""

    name = "local"

    def run(self, argv: Sequence[str], timeout: float) -> CommandResult:
        """Run ``argv`` as a subprocess."""
        return _run(list(argv), timeout)

    def push(self, local: Path, remote: str) -> None:
        """Copy ``local`` to ``remote`` unless it is the same file."""
        target = Path(remote)
        if target.resolve() != local.resolve():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(local, target)

    def host(self) -> str:
        """This machine's host name."""
        return socket.gethostname()


@dataclass
class AdbTransport:
    """An Android phone over adb (USB or ``adb connect``), commands through ``adb shell``."""

    serial: str | None = None
    """Device serial (``adb devices``); None for the only device attached."""
    adb: str = "adb"
    """adb executable."""
    name: str = "adb"
    """Transport name in results."""

    def _base(self) -> list[str]:
        return [self.adb, *(["-s", self.serial] if self.serial else [])]

    def command(self, argv: Sequence[str]) -> list[str]:
        """The host command that runs ``argv`` on the phone."""
        return [*self._base(), "shell", shlex.join(argv)]

    def run(self, argv: Sequence[str], timeout: float) -> CommandResult:
        """Run ``argv`` in the phone's shell."""
        return _run(self.command(argv), timeout)

    def push(self, local: Path, remote: str) -> None:
        """``adb push``."""
        _checked(_run([*self._base(), "shell", "mkdir", "-p", str(Path(remote).parent)], 60), "adb mkdir")
        _checked(_run([*self._base(), "push", str(local), remote], 3600), f"adb push {local.name}")

    def host(self) -> str:
        """The phone's model name (``ro.product.model``)."""
        result = self.run(["getprop", "ro.product.model"], 30)
        return result.stdout.strip() or (self.serial or "android")


@dataclass
class SshTransport:
    """A board reachable over ssh (key authentication, no prompts)."""

    host_name: str
    """Host name or address."""
    user: str | None = None
    """Login user (default: ssh's)."""
    port: int = 22
    """ssh port."""
    identity: str | None = None
    """Private key file."""
    options: tuple[str, ...] = ("BatchMode=yes", "StrictHostKeyChecking=accept-new")
    """``-o`` options."""
    name: str = "ssh"
    """Transport name in results."""

    def _options(self, port_flag: str) -> list[str]:
        args = [port_flag, str(self.port)]
        for option in self.options:
            args += ["-o", option]
        return args + (["-i", self.identity] if self.identity else [])

    def _target(self) -> str:
        return f"{self.user}@{self.host_name}" if self.user else self.host_name

    def command(self, argv: Sequence[str]) -> list[str]:
        """The host command that runs ``argv`` on the board."""
        return ["ssh", *self._options("-p"), self._target(), shlex.join(argv)]

    def run(self, argv: Sequence[str], timeout: float) -> CommandResult:
        """Run ``argv`` on the board."""
        return _run(self.command(argv), timeout)

    def push(self, local: Path, remote: str) -> None:
        """``scp`` (after ``mkdir -p`` of the folder)."""
        _checked(self.run(["mkdir", "-p", str(Path(remote).parent)], 60), "ssh mkdir")
        _checked(_run(["scp", *self._options("-P"), str(local), f"{self._target()}:{remote}"], 3600), "scp")

    def host(self) -> str:
        """The board's host name."""
        return self.run(["hostname"], 30).stdout.strip() or self.host_name


# --- llama.cpp programs on the device -----------------------------------------------------------

_PERF_LINE = re.compile(
    r"(?P<what>load|prompt eval|eval|total) time =\s*(?P<ms>[\d.]+) ms(?: /\s*(?P<n>\d+) (?:tokens|runs))?"
)
_ENCODE_LINE = re.compile(r"(?:mtmd batch encoding done in|image slice encoded in) (?P<ms>\d+) ms")
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
    name: str = "llama.cpp-binary"
    """Backend name in results."""

    def run(self, llm: Path, mmproj: Path | None, settings: BenchSettings) -> Measurement:
        """Copy the files to the device, run the three programs, parse what they print."""
        model = self._push(llm)
        lm, rss = self._completion(model, settings)
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

    def _completion(self, model: str, settings: BenchSettings) -> tuple[Phase, float | None]:
        args = [*self._common(model, settings), "-no-cnv", "-p", LM_PROMPT, "-n", str(settings.lm_tokens)]
        start = time.perf_counter()
        result = self._program("llama-completion", args)
        wall = time.perf_counter() - start
        return phase_from_perf(parse_perf(result.stderr), wall), parse_peak_rss_mb(result.stderr)

    def _mtmd(self, model: str, mmproj: str, settings: BenchSettings) -> Phase:
        picture = Path(self._picture())
        image = self._push(picture)
        args = [*self._common(model, settings), "--mmproj", mmproj, "--image", image, "--chat-template",
                "vicuna", "-p", VLM_QUESTION, "-n", str(settings.vlm_tokens)]  # fmt: skip
        start = time.perf_counter()
        result = self._program("llama-mtmd-cli", args)
        wall = time.perf_counter() - start
        return phase_from_perf(parse_perf(result.stderr), wall, parse_encode_ms(result.stderr))

    def _picture(self) -> str:
        import tempfile

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


# --- device classes (work pools) ----------------------------------------------------------------

POOLS_FILE = Path(__file__).resolve().parents[1] / "infra" / "runners" / "pools.yaml"
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


# --- results ------------------------------------------------------------------------------------


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
    from tasks.identity import code_version, hash_json

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
    if measurement.peak_rss_mb is None and isinstance(transport, LocalTransport):
        measurement.peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return BenchResult(
        identity=bench_identity(quant_id, device, settings, nonce),
        device=device.name, soc=device.soc, backend=backend.name, transport=device.transport,
        runner_host=socket.gethostname(), device_host=transport.host(), quant_id=quant_id,
        quant_type=quant_type, model_size_bytes=llm.stat().st_size, settings=dataclasses.asdict(settings),
        measurement=measurement,
    )  # fmt: skip


def bench_payload(result: BenchResult, quant_run_id: str, export_id: str = "", model: str = "") -> Any:
    """The MLflow payload of a result: a child run of the quant run, tagged for reports."""
    from tasks.mlflow_push import KIND_TAG, Payload

    tags = {
        KIND_TAG: "bench",
        "mlflow.parentRunId": quant_run_id,
        "mvlm.quant_run_id": quant_run_id,
        "mvlm.quant_id": result.quant_id,
        "mvlm.export_id": export_id,
        "model": model,
        "device": result.device,
        "soc": result.soc,
        "backend": result.backend,
        "transport": result.transport,
        "threads": str(result.settings["threads"]),
        "quant_type": result.quant_type,
        "llama_cpp_build": result.measurement.llama_cpp,
        "runner_host": result.runner_host,
        "device_host": result.device_host,
    }
    return Payload(
        identity=result.identity,
        run_name=f"bench-{result.device}-{result.quant_type}",
        tags=tags,
        params={k: str(v) for k, v in result.settings.items()},
        metrics=result.metrics(),
        artifacts={"bench_result.json": dataclasses.asdict(result)},
    )


# --- reports ------------------------------------------------------------------------------------

# The paper's device results (MobileVLM, arXiv 2312.16886, Tables 5-6; 4-bit = q4_k_s through llama.cpp).
PAPER_RESULTS: list[dict[str, Any]] = [
    {"device": "snapdragon-888", "quant_type": "q4_k_s", "model": "MobileVLM-1.7B",
     "vlm.eval_tps": 21.54, "vlm.total_s": 18.51, "vlm.prompt_tps": 34.93},
    {"device": "snapdragon-888", "quant_type": "q4_k_s", "model": "MobileVLM-3B",
     "vlm.eval_tps": 12.21, "vlm.total_s": 33.10},
    {"device": "snapdragon-888", "quant_type": "q4_k_s", "model": "MobileLLaMA-1.4B", "lm.eval_tps": 28.32},
    {"device": "snapdragon-888", "quant_type": "q4_k_s", "model": "MobileLLaMA-2.7B", "lm.eval_tps": 14.71},
    {"device": "jetson-orin", "quant_type": "q4_k_s", "model": "MobileVLM-1.7B",
     "vlm.eval_tps": 65.27, "vlm.total_s": 5.14, "vlm.prompt_tps": 667.69},
    {"device": "jetson-orin", "quant_type": "q4_k_s", "model": "MobileVLM-3B", "vlm.eval_tps": 38.34,
     "vlm.total_s": 8.31},
]  # fmt: skip
REPORT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("lm.eval_tps", "LM eval tok/s"),
    ("lm.prompt_tps", "LM prompt tok/s"),
    ("lm.total_s", "LM total s"),
    ("vlm.prompt_tps", "VLM prompt tok/s"),
    ("vlm.eval_tps", "VLM eval tok/s"),
    ("vlm.total_s", "VLM total s"),
    ("vlm.vision_encode_ms", "vision ms"),
    ("pp512.mean_tps", "pp512 tok/s"),
    ("tg128.mean_tps", "tg128 tok/s"),
    ("peak_rss_mb", "peak RSS MB"),
    ("model_size_gb", "size GB"),
)


def report_rows(uri: str | None = None) -> list[dict[str, Any]]:
    """Our bench results from MLflow (one row per complete run) followed by the paper's rows."""
    from tasks.mlflow_push import COMPLETE_TAG, KIND_TAG, client, experiment_id, tracking_uri

    mlflow = client(tracking_uri(uri))
    runs = mlflow.search_runs(
        [experiment_id(mlflow)],
        filter_string=f"tags.`{KIND_TAG}` = 'bench' and tags.`{COMPLETE_TAG}` = 'true'",
    )
    rows = [
        {"source": "ours", "device": r.data.tags.get("device", "?"),
         "quant_type": r.data.tags.get("quant_type", "?"),
         "model": r.data.tags.get("model", r.data.tags.get("mvlm.quant_id", "?")[:8]),
         "backend": r.data.tags.get("backend", "?"), "run_id": r.info.run_id, **r.data.metrics}
        for r in runs
    ]  # fmt: skip
    paper = [{"source": "paper", "backend": "llama.cpp", "run_id": "", **p} for p in PAPER_RESULTS]
    return rows + paper


def report_groups(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Rows grouped by (device, quant type): ours first, the paper's beside them."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in sorted(rows, key=lambda r: (r["device"], r["quant_type"], r["source"] != "ours", r["model"])):
        groups.setdefault((row["device"], row["quant_type"]), []).append(row)
    return groups


def write_chart(rows: list[dict[str, Any]], path: str | Path, metric: str = "lm.eval_tps") -> Path:
    """Bar chart of ``metric`` (default: generation tok/s) for every row that has it, ours and paper's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [r for r in rows if metric in r] + [r for r in rows if metric not in r and "vlm.eval_tps" in r]
    labels = [f"{r['device']}\n{r['model']}\n{r['quant_type']} ({r['source']})" for r in chosen]
    values = [float(r.get(metric, r.get("vlm.eval_tps", 0.0))) for r in chosen]
    colours = ["tab:blue" if r["source"] == "ours" else "tab:gray" for r in chosen]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(chosen)), 4.5))
    ax.bar(range(len(chosen)), values, color=colours)
    ax.set_xticks(range(len(chosen)), labels, fontsize=7)
    ax.set_ylabel("generation tokens/s (log)")
    ax.set_yscale("log")
    ax.set_title("MobileVLM device benchmarks: ours (blue) and the paper's (grey)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
