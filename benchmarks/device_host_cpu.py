"""Our host-cpu runner vs a bare llama-cpp-python loop on MobileLLaMA-1.4B shapes (random weights).

Builds (once, cached in ``--work``) an f16 GGUF with MobileLLaMA-1.4B's shapes (24 layers, width
2048, 16 heads, SwiGLU 5632) and random weights, carrying the real LLaMA vocabulary (32,000 pieces
with their SentencePiece scores, fetched by ``tasks.testkit.llama_cpp_source``), quantizes it to
q4_0 and q4_k_s through our quantize step, then on the same file in the same process measures
prompt processing (pp) and generation (tg) tokens/s twice: through our runner
(``tasks.ship.bench.PythonBackend.bench``) and through a bare loop over llama-cpp-python's
``llama_decode`` with ``llama_batch_get_one``.
The ratio printed last is the runner's overhead (bare tok/s over ours; 1.00 = none).

    python benchmarks/device_host_cpu.py [--threads 2] [--pp 128] [--tg 32] [--repetitions 3]
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from model.config import get_config
from model.gguf_export import write_llm_gguf
from model.gguf_vocab import vocab_from_sentencepiece
from model.mobilevlm import hf_config
from tasks.ship.bench import BenchSettings, LlamaCpp, PythonBackend, RuntimeOptions
from tasks.ship.quantize import quantize
from tasks.testkit.llama_cpp_source import fetch_llama_vocab, released_tokenizer

CORPUS = ["Building a website can be done in 10 simple steps.", "Step 1: choose a domain name."] * 20


def random_f16_gguf(path: Path) -> Path:
    """MobileLLaMA-1.4B shapes with random f16 weights (std 0.02), written as our exporter writes them."""
    if path.is_file():
        return path
    config = hf_config(get_config("mobilellama-1.4b"))
    vocab = vocab_from_sentencepiece(
        released_tokenizer(fetch_llama_vocab(), path.parent / "tokenizer") / "tokenizer.model",
        config.vocab_size,
        None,
    )
    generator = torch.Generator().manual_seed(0)
    state = {}
    shapes = _shapes(config)
    for key, shape in shapes.items():
        if len(shape) == 1:
            state[key] = torch.ones(shape, dtype=torch.float16)
        else:
            state[key] = (torch.randn(shape, generator=generator, dtype=torch.float32) * 0.02).half()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_llm_gguf(state, config, vocab, path, "f16")
    return path


def _shapes(config) -> dict[str, tuple[int, ...]]:
    h, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h),
    }  # fmt: skip
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (h, h),
            p + "self_attn.v_proj.weight": (h, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
        }  # fmt: skip
    return shapes


def bare_loop(path: Path, settings: BenchSettings) -> dict[str, list[float]]:
    """pp / tg seconds through llama-cpp-python directly: one context, llama_batch_get_one, llama_decode."""
    import llama_cpp

    options = RuntimeOptions(
        n_ctx=settings.pp_tokens + 8, n_batch=settings.pp_tokens, threads=settings.threads
    )
    with LlamaCpp(path, options) as runtime:  # same load path; the loop below is bare llama_cpp
        ctx, n_vocab = runtime.ctx, runtime.n_vocab
        tokens = np.random.default_rng(0).integers(3, n_vocab, settings.pp_tokens).astype(np.int32)
        memory = llama_cpp.llama_get_memory(ctx)

        def decode(array: np.ndarray) -> None:
            batch = llama_cpp.llama_batch_get_one(
                array.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), len(array)
            )
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")

        def pp() -> float:
            llama_cpp.llama_memory_clear(memory, True)
            start = time.perf_counter()
            decode(tokens)
            return time.perf_counter() - start

        def tg() -> float:
            llama_cpp.llama_memory_clear(memory, True)
            start = time.perf_counter()
            for i in range(settings.tg_tokens):
                decode(tokens[i : i + 1])
            return time.perf_counter() - start

        pp()  # warm-up, as llama-bench
        return {
            "pp": [pp() for _ in range(settings.repetitions)],
            "tg": [tg() for _ in range(settings.repetitions)],
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("work_dir/bench-device-host-cpu"))
    parser.add_argument("--threads", type=int, default=1, help="1 keeps a busy 2-core CI box stable")
    parser.add_argument(
        "--pp", type=int, default=128, help="prompt tokens (llama-bench -p; 512 is its default)"
    )
    parser.add_argument(
        "--tg", type=int, default=32, help="generated tokens (llama-bench -n; 128 is its default)"
    )
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--types", default="q4_0,q4_k_s")
    args = parser.parse_args()
    one = BenchSettings(threads=args.threads, pp_tokens=args.pp, tg_tokens=args.tg, repetitions=1)

    f16 = random_f16_gguf(args.work / "mobilellama-1.4b-random-f16.gguf")
    ratios = []
    print(f"{'type':8} {'test':7} {'runner tok/s':>14} {'bare tok/s':>12} {'bare/runner':>12}")
    for quant_type in args.types.split(","):
        quant = quantize(f16, quant_type, args.work / quant_type, threads=2, eval_text=CORPUS[0] * 4)
        ours: dict[str, list[float]] = {"pp": [], "tg": []}
        bare: dict[str, list[float]] = {"pp": [], "tg": []}
        for _ in range(args.repetitions):  # interleaved, so load on the machine hits both alike
            speeds, _ = PythonBackend().bench(quant.llm, one)
            ours["pp"].append(speeds[0].mean_tps)
            ours["tg"].append(speeds[1].mean_tps)
            seconds = bare_loop(quant.llm, one)
            bare["pp"].append(args.pp / seconds["pp"][0])
            bare["tg"].append(args.tg / seconds["tg"][0])
        for key, test in (("pp", f"pp{args.pp}"), ("tg", f"tg{args.tg}")):
            runner_tps, bare_tps = statistics.fmean(ours[key]), statistics.fmean(bare[key])
            ratios.append(bare_tps / runner_tps)
            print(f"{quant_type:8} {test:7} {runner_tps:14.2f} {bare_tps:12.2f} {ratios[-1]:12.3f}")
    print(f"runner overhead (bare tok/s / runner tok/s, mean over tests): {statistics.fmean(ratios):.3f}")


if __name__ == "__main__":
    main()
