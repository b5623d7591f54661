"""Forward+backward time of the tiny MobileVLM on text+image batches vs plain LlamaForCausalLM.

Both see the same number of tokens per sample (the VLM's visual tokens count as tokens), the same
batch size and the same weights for the language part, in the same process. The ratio printed last
is our multimodal overhead (vision tower, projector and splicing). Absolute times are noise here.

    python benchmarks/model_step.py [--model mobilevlm-tiny] [--batch 8] [--text 60] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import model
from model.conversation import IMAGE_TOKEN_INDEX


def time_steps(step, repeats: int) -> list[float]:
    """Wall seconds of ``repeats`` calls after two warm-up calls."""
    for _ in range(2):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilevlm-tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--text", type=int, default=60, help="text tokens per sample besides the image")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    vlm = model.build(args.model).train()
    size = vlm.config.vision_config["image_size"]
    visual = model.get_config(args.model).visual_tokens
    vocab = vlm.config.vocab_size
    text = torch.randint(3, vocab, (args.batch, args.text))
    ids = torch.cat([text[:, :1], torch.full((args.batch, 1), IMAGE_TOKEN_INDEX), text[:, 1:]], dim=1)
    images = torch.randn(args.batch, 3, size, size)

    llama_config = LlamaConfig(
        **{k: v for k, v in vlm.config.to_dict().items() if k in LlamaConfig.__dataclass_fields__}
    )
    llama = LlamaForCausalLM(llama_config).train()
    llama.load_state_dict(
        {k: v for k, v in vlm.state_dict().items() if not k.startswith(("model.vision", "model.mm_"))}
    )
    plain_ids = torch.randint(3, vocab, (args.batch, args.text + visual))

    def ours() -> None:
        vlm(input_ids=ids, labels=ids.clamp(min=0), images=images).loss.backward()
        vlm.zero_grad(set_to_none=True)

    def plain() -> None:
        llama(input_ids=plain_ids, labels=plain_ids).loss.backward()
        llama.zero_grad(set_to_none=True)

    t_ours = statistics.median(time_steps(ours, args.repeats))
    t_plain = statistics.median(time_steps(plain, args.repeats))
    tokens = args.batch * (args.text + visual)
    print(f"model {args.model}: batch {args.batch}, {args.text + visual} tokens/sample ({visual} visual)")
    print(f"ours  (MobileVLM, text+image)  median {t_ours * 1e3:8.2f} ms  {tokens / t_ours:10.0f} tok/s")
    print(f"plain (LlamaForCausalLM, text) median {t_plain * 1e3:8.2f} ms  {tokens / t_plain:10.0f} tok/s")
    print(f"ratio ours/plain step time: {t_ours / t_plain:.3f}")


if __name__ == "__main__":
    main()
