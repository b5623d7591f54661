"""One optimizer step of a tiny VLM through the real DeepSpeed engine (ZeRO-2 on CPU, one gloo rank),
for ``test_param_groups``: ``python tests/deepspeed_probe.py groups|lora`` prints ``RESULT {json}``
with the largest change of each part's parameters and the optimizer's groups."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys


def part_name(name: str) -> str:
    """The part a parameter belongs to, with the language model's lm_head, embeddings and adapters apart."""
    for marker, part in (("lora_", "lora"), ("lm_head", "lm_head"), ("embed_tokens", "embed"),
                         ("mm_projector.", "projector"), ("vision_tower.", "vision")):  # fmt: skip
        if marker in name:
            return part
    return "llm"


def main(mode: str) -> dict:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch
    import torch.distributed as dist

    import model as mvlm
    from model.lora import apply_lora
    from model.train import LoopConfig, _part_lrs, make_optimizer, set_trainable
    from tasks.train.deepspeed_config import deepspeed_config
    from tasks.train.recipes import get_recipe

    lora = mode == "lora"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    os.environ.update(rendezvous, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    one_rank = {"num_workers": 1, "micro_batch": 2, "global_batch": 2}
    stage = get_recipe("tiny", **{"vlm-instruct": one_rank}).stage("vlm-instruct")
    torch.manual_seed(0)
    vlm = mvlm.build("mobilevlm-tiny-336", vocab_size=64)
    set_trainable(vlm, ("projector", "llm"), lora=lora)
    if lora:
        apply_lora(vlm, 4, 8, 0.0, ("q_proj", "v_proj"))
    rates = {} if lora else {"projector": 1e-2}
    cfg = LoopConfig(10, 1, 100, 1e-3, 1e-4, 0, 0.0, (0.9, 0.95), part_lrs=rates)
    optimizer, scheduler = make_optimizer(vlm, cfg)
    before = {n: p.detach().clone() for n, p in vlm.named_parameters()}
    config = deepspeed_config(stage, False)
    # ZeRO-2 as the 2-worker stage runs it (one rank alone trains without ZeRO partitions).
    config["zero_optimization"] = deepspeed_config(
        dataclasses.replace(stage, num_workers=2, global_batch=4), False
    )["zero_optimization"]
    assert config["zero_optimization"]["stage"] == 2
    engine, *_ = deepspeed.initialize(
        model=vlm, optimizer=optimizer, lr_scheduler=scheduler, config=config, dist_init_required=False
    )
    ids = torch.randint(3, 64, (2, 20))
    ids[:, 1] = -200
    labels = ids.clone()
    labels[:, :2] = -100
    images = torch.randn(2, 3, 336, 336)
    out = engine(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, images=images)
    engine.backward(out.loss)
    engine.step()
    moved: dict[str, float] = {}
    for name, param in engine.module.named_parameters():
        delta = (param.detach() - before[name]).abs().max().item() if name in before else float("nan")
        moved[part_name(name)] = max(moved.get(part_name(name), 0.0), delta)
    groups = [(g.get("name"), g["lr"], len(g["params"])) for g in engine.optimizer.param_groups]
    return {"moved": moved, "lrs": _part_lrs(engine), "groups": groups}


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(sys.argv[1])))
