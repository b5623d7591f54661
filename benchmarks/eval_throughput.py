"""Questions/s of our evaluation paths against bare loops on the same questions.

PyTorch: ``tasks.quality.harness.ask`` with the PyTorch answerer (image decode, preprocessing,
prompt rendering, tokenising, batched greedy ``generate``) vs a bare loop of ``generate`` calls on
the same batches, prepared before the clock starts. llama.cpp: the harness with the llama.cpp
answerer vs a bare loop over the same library calls (``llama_decode`` of the same token ids,
``mtmd_helper_eval_chunks`` for the image, argmax over the logits). Both on the tiny GQA replica
with a ``mobilevlm-tiny-336`` (random weights, so every answer runs to the token limit).
The ratios printed last are bare time / our time (1.00 = no overhead; targets 0.9 and 0.95).

    python benchmarks/eval_throughput.py [--questions 192] [--batch 16] [--tokens 8] [--repetitions 3]
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import model as mvlm
from model.conversation import IMAGE_TOKEN_INDEX, build_prompt, tokenize_prompt
from model.image import preprocess_images
from model.tokenizer import train_tokenizer
from tasks.quality.backends import LlamaCppAnswerer, TorchAnswerer
from tasks.quality.eval_files import load_image
from tasks.quality.eval_sets import read_eval_set
from tasks.quality.eval_specs import find_eval_spec
from tasks.quality.harness import ask
from tasks.ship.export import export_checkpoint
from tasks.testkit.eval_samples import make_eval_sets
from tasks.testkit.samples import SampleConfig


def setup(work: Path, n: int) -> tuple[list, Path, object]:
    """The first ``n`` GQA replica questions, a random tiny checkpoint and its f32 GGUF export."""
    for relative, data in make_eval_sets(SampleConfig()).items():
        path = work / "samples" / "eval" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    items = read_eval_set(find_eval_spec("tiny-gqa")[1], work).items[:n]
    texts = [build_prompt(i.prompt, "v1", True) for i in items] * 4
    tokenizer = train_tokenizer(texts, vocab_size=400)
    torch.manual_seed(0)
    checkpoint = mvlm.save(
        mvlm.build("mobilevlm-tiny-336", vocab_size=len(tokenizer)), work / "ckpt", tokenizer
    )
    export = export_checkpoint(checkpoint, work / "export")
    return items, checkpoint, export


def bare_torch(answerer: TorchAnswerer, items: list, batch: int, tokens: int) -> float:
    """Seconds of bare ``generate`` calls over the same left-padded batches."""
    vlm, tok = answerer.vlm, answerer.tokenizer
    size, mode = vlm.config.vision_config["image_size"], vlm.config.image_aspect_ratio
    batches = []
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        ids = [tokenize_prompt(build_prompt(i.prompt, "v1", True), tok) for i in chunk]
        longest = max(map(len, ids))
        input_ids = torch.tensor([[tok.pad_token_id] * (longest - len(p)) + p for p in ids])
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in ids])
        pixels = preprocess_images([load_image(i.image) for i in chunk], size, mode)
        batches.append((input_ids, mask, pixels))
    start = time.perf_counter()
    with torch.no_grad():
        for input_ids, mask, pixels in batches:
            vlm.generate(input_ids=input_ids, attention_mask=mask, images=pixels, max_new_tokens=tokens,
                         do_sample=False, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)  # fmt: skip
    return time.perf_counter() - start


def bare_llama(answerer: LlamaCppAnswerer, items: list, tokens: int) -> float:
    """Seconds of the same llama.cpp calls without the harness: decode, mtmd helper, argmax."""
    import llama_cpp
    from llama_cpp import mtmd_cpp

    runtime, tok = answerer.runtime, answerer.tokenizer
    prepared = []
    for item in items:
        ids = tokenize_prompt(build_prompt(item.prompt, "v1", True), tok)
        at = ids.index(IMAGE_TOKEN_INDEX)
        prepared.append(
            (np.array(ids[:at], np.int32), load_image(item.image), np.array(ids[at + 1 :], np.int32))
        )
    ctx, memory = runtime.ctx, llama_cpp.llama_get_memory(runtime.ctx)
    n_vocab = runtime.n_vocab

    def decode(array: np.ndarray) -> None:
        batch = llama_cpp.llama_batch_get_one(
            array.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), len(array)
        )
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    start = time.perf_counter()
    for before, image, after in prepared:
        llama_cpp.llama_memory_clear(memory, True)
        decode(before)
        chunks = runtime._mtmd_tokenize("<image>", image, add_special=False)
        past = ctypes.c_int(0)
        mtmd_cpp.mtmd_helper_eval_chunks(
            runtime.mtmd, ctx, chunks, len(before), 0, 512, False, ctypes.byref(past)
        )
        mtmd_cpp.mtmd_input_chunks_free(chunks)
        decode(after)
        for _ in range(tokens):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
            token = int(np.argmax(logits))
            if llama_cpp.llama_vocab_is_eog(runtime.vocab, token):
                break
            decode(np.array([token], np.int32))
    return time.perf_counter() - start


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=192)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--repetitions", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        items, checkpoint, export = setup(Path(folder), args.questions)
        torch_answerer = TorchAnswerer(checkpoint, batch=args.batch)
        llama = LlamaCppAnswerer(export.llm, export.mmproj, checkpoint, threads=1)
        ask(torch_answerer, items[:8], args.tokens)  # warm-up
        ours_t, bare_t, ours_l, bare_l = [], [], [], []
        for _ in range(args.repetitions):  # interleaved, so drift on a shared machine hits both
            ours_t.append(timed(lambda: ask(torch_answerer, items, args.tokens)))
            bare_t.append(bare_torch(torch_answerer, items, args.batch, args.tokens))
            ours_l.append(timed(lambda: ask(llama, items, args.tokens)))
            bare_l.append(bare_llama(llama, items, args.tokens))
        llama.close()
    n = len(items)
    for name, ours, bare in (("pytorch", ours_t, bare_t), ("llama.cpp", ours_l, bare_l)):
        o, b = statistics.median(ours), statistics.median(bare)
        print(f"{name}: ours {n / o:.1f} q/s, bare {n / b:.1f} q/s (median of {args.repetitions})")
    torch_ratio = statistics.median(bare_t) / statistics.median(ours_t)
    llama_ratio = statistics.median(bare_l) / statistics.median(ours_l)
    print(f"ratio pytorch bare/ours {torch_ratio:.2f} (target >= 0.9)")
    print(f"ratio llama.cpp bare/ours {llama_ratio:.2f} (target >= 0.95)")


if __name__ == "__main__":
    main()
