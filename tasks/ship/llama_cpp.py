"""llama.cpp runtime: a small wrapper over llama-cpp-python's low-level API.

``LlamaCpp`` loads a GGUF (optionally with an mmproj) into one context: batches, greedy decoding and
the mtmd multimodal library. Export and quantization checks use it too.
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

_LOG_CALLBACKS: list[Any] = []  # ctypes callbacks must outlive the C library's use of them


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
