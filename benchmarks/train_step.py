"""Stage-1 tokens/s of our training path vs a plain PyTorch loop, same model, batch and data.

Ours: the real loader (webdataset shards of a tiny-redpajama build, mixture, collate) feeding the
DeepSpeed engine (ZeRO-1, CPU, one process, world size 1) through ``model.train.run_loop``.
Plain: the same model and optimizer, the same batches already in memory, a bare
forward/backward/step loop. Printed last: ours/plain tokens/s and our data-wait fraction.

    python benchmarks/train_step.py [--steps 40] [--micro-batch 8] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("MVLM_NO_PROGRESS", "1")


def build_data(root: Path) -> Path:
    """Samples + tiny-redpajama build; returns the tokenizer folder."""
    from tasks.build import build_dataset
    from tasks.samples import make_samples

    make_samples(root / "samples")
    spec = Path(__file__).resolve().parent.parent / "data_specs" / "tiny-redpajama.yaml"
    build_dataset(spec, root)
    return root / "samples" / "tokenizer"


def single_process_group() -> None:
    """A one-rank gloo process group, as Ray Train would set up."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    dist.init_process_group("gloo", rank=0, world_size=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()

    import deepspeed
    import torch

    import model as mvlm
    from model.train import LoopConfig, LoopState, make_optimizer, run_loop
    from tasks.recipes import get_recipe
    from tasks.train_stage import loader_config, resolve_builds

    root = Path(tempfile.mkdtemp(prefix="mvlm-bench-"))
    tokenizer = build_data(root)
    stage = get_recipe("tiny", **{"llm-pretrain": {"num_workers": 1, "micro_batch": args.micro_batch,
                                                   "global_batch": args.micro_batch, "seq_len": args.seq_len}}
                       ).stage("llm-pretrain")  # fmt: skip
    loader = loader_config(stage, resolve_builds(stage, root), "train", str(tokenizer))
    single_process_group()
    from tasks.loader import batches

    cfg = LoopConfig(args.steps, 1, 10**9, 1e-3, 1e-4, 0, 0.0, (0.9, 0.95))

    torch.manual_seed(0)
    model = mvlm.build("tiny-llama")
    optimizer, scheduler = make_optimizer(model, cfg)
    ds = {"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": 1}, "gradient_clipping": 1.0, "steps_per_print": 10**9}  # fmt: skip
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
    rows: list[dict] = []
    run_loop(engine, lambda pos: batches(loader, 0, 1, pos), cfg, LoopState(), root / "ckpt", rows.extend)
    steady = rows[5:]
    ours_tok_s = statistics.median(r["tokens_per_s"] for r in steady)
    wait = statistics.mean(r["data_wait_fraction"] for r in steady)

    torch.manual_seed(0)
    plain = mvlm.build("tiny-llama")
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-3, betas=(0.9, 0.95))
    stream = batches(loader, 0, 1, {})
    data = [next(stream)[0] for _ in range(args.steps)]
    for batch in data:
        batch.pop("skipped_samples", None)
    times = []
    for batch in data:
        start = time.perf_counter()
        plain(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    tokens = args.micro_batch * args.seq_len
    plain_tok_s = tokens / statistics.median(times[5:])
    print(
        f"tiny-llama, micro batch {args.micro_batch} x {args.seq_len} tokens, {args.steps} steps, 1 process"
    )
    print(f"ours  (shards -> loader -> DeepSpeed ZeRO-1 step): {ours_tok_s:10.0f} tok/s (median)")
    print(f"plain (in-memory batches -> torch AdamW step):     {plain_tok_s:10.0f} tok/s (median)")
    print(f"data-wait fraction (ours): {wait:.3f}")
    print(f"ratio ours/plain tokens/s: {ours_tok_s / plain_tok_s:.3f}")


if __name__ == "__main__":
    main()
