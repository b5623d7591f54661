"""Stage-1 tokens/s of our training path vs a plain PyTorch loop, same model, batch and data.

Ours: the real loader (webdataset shards of a tiny-redpajama build made at the benchmark's sequence
length, mixture, collate) feeding the DeepSpeed engine built from the stage's own config (CPU, one
process, world size 1: no ZeRO partitions, as a one-rank stage trains) through
``model.train.run_loop``. Plain: the same model and optimizer, the same batches already in memory,
a bare forward/backward/clip/step loop. Both count the tokens of the batches they trained on
(``attention_mask`` sums).

Two sizes: ``tiny`` (tiny-llama, 8 x 128 tokens: framework overhead is visible) and ``compute``
(width 512, 8 layers, 8 x 512 tokens: the matrix work dominates). Printed last: the lower of the two
ours/plain ratios.

    python benchmarks/train_step.py [--sizes tiny,compute] [--steps N]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("MVLM_NO_PROGRESS", "1")

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Size:
    """One benchmark size."""

    micro_batch: int
    """Sequences per step."""
    seq_len: int
    """Tokens per sequence (the data are built at this length)."""
    overrides: dict[str, int]
    """Shape changes to the ``tiny-llama`` row."""
    steps: int
    """Optimizer steps (the first 5 are not counted; enough that the shuffle buffers' fill is amortised)."""


SIZES = {
    "tiny": Size(8, 128, {}, 120),
    "compute": Size(8, 512, {"n_layer": 8, "hidden": 512, "n_head": 8, "intermediate": 1408}, 12),
}


def build_data(root: Path, seq_len: int) -> Path:
    """Samples + a tiny-redpajama build at ``seq_len``; returns the spec folder."""
    from tasks.data.build import build_dataset
    from tasks.testkit.sample_tree import make_samples

    if not (root / "samples").is_dir():
        make_samples(root / "samples")
    specs = root / f"specs-{seq_len}"
    specs.mkdir(exist_ok=True)
    text = (REPO / "data_specs" / "tiny-redpajama.yaml").read_text()
    (specs / "tiny-redpajama.yaml").write_text(text.replace("seq_len: 128", f"seq_len: {seq_len}"))
    build_dataset(specs / "tiny-redpajama.yaml", root)
    return specs


def single_process_group() -> None:
    """A one-rank gloo process group, as Ray Train would set up."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    dist.init_process_group("gloo", rank=0, world_size=1)


def tokens_of(batch: dict[str, Any]) -> int:
    """Tokens trained on, counted as ``run_loop`` counts them."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def measure(root: Path, size: Size, steps: int) -> tuple[float, float, float]:
    """(ours tok/s, plain tok/s, our data-wait fraction), medians over the steady steps; the plain loop
    runs before and after ours (mean of the two), so neither side gets the warmer machine."""
    import deepspeed
    import torch

    import model as mvlm
    from model.train import LoopConfig, LoopState, make_optimizer, run_loop
    from tasks.train.deepspeed_config import deepspeed_config
    from tasks.train.loader import batches
    from tasks.train.recipes import get_recipe
    from tasks.train.stage import loader_config, resolve_builds

    specs = build_data(root, size.seq_len)
    stage_over = {"num_workers": 1, "micro_batch": size.micro_batch, "global_batch": size.micro_batch,
                  "seq_len": size.seq_len}  # fmt: skip
    stage = get_recipe("tiny", **{"llm-pretrain": stage_over}).stage("llm-pretrain")
    tokenizer = str(root / "samples" / "tokenizer")
    loader = loader_config(stage, resolve_builds(stage, root, str(specs)), "train", tokenizer)
    single_process_group()
    first = batches(loader, 0, 1, {})
    data = [next(first)[0] for _ in range(steps)]
    first.close()
    for batch in data:
        batch.pop("skipped_samples", None)
    plain_before = plain_rate(size, data)
    cfg = LoopConfig(steps, 1, 10**9, 1e-3, 1e-4, 0, 0.0, (0.9, 0.95))

    torch.manual_seed(0)
    ours = mvlm.build("tiny-llama", **size.overrides)
    optimizer, scheduler = make_optimizer(ours, cfg)
    engine, *_ = deepspeed.initialize(
        model=ours, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(stage, False),
        dist_init_required=False,
    )  # fmt: skip
    rows: list[dict] = []
    run_loop(engine, lambda pos: batches(loader, 0, 1, pos), cfg, LoopState(), root / "ckpt", rows.extend)
    steady = rows[5:]
    ours_tok_s = statistics.median(r["tokens_per_s"] for r in steady)
    wait = statistics.mean(r["data_wait_fraction"] for r in steady)

    return ours_tok_s, (plain_before + plain_rate(size, data)) / 2, wait


def plain_rate(size: Size, data: list[dict[str, Any]]) -> float:
    """Median tok/s of a bare loop over in-memory batches (the first 5 steps not counted)."""
    import torch

    import model as mvlm

    torch.manual_seed(0)
    plain = mvlm.build("tiny-llama", **size.overrides)
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-3, betas=(0.9, 0.95))
    rates = []
    for batch in data:
        start = time.perf_counter()
        plain(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rates.append(tokens_of(batch) / (time.perf_counter() - start))
    return statistics.median(rates[5:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,compute", help=f"comma-separated, of {sorted(SIZES)}")
    parser.add_argument("--steps", type=int, default=None, help="override every size's step count")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mvlm-bench-"))
    ratios = []
    for name in args.sizes.split(","):
        size = SIZES[name]
        steps = args.steps or size.steps
        ours, plain, wait = measure(root, size, steps)
        ratios.append(ours / plain)
        shape = ", ".join(f"{k} {v}" for k, v in size.overrides.items()) or "tiny-llama"
        print(f"[{name}] {shape}; micro batch {size.micro_batch} x {size.seq_len} tokens, {steps} steps")
        print(f"  ours  (shards -> loader -> stage's DeepSpeed step):   {ours:10.0f} tok/s (median)")
        print(f"  plain (in-memory batches -> torch AdamW):          {plain:10.0f} tok/s (mean of 2 runs)")
        print(f"  data-wait fraction (ours): {wait:.3f}; ratio ours/plain {ours / plain:.3f}")
    print(f"ratio ours/plain tokens/s (lowest of {args.sizes}): {min(ratios):.3f}")


if __name__ == "__main__":
    main()
