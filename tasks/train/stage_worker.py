"""The Ray Train worker side of a stage: build the model, wrap it in DeepSpeed, resume from the latest
checkpoint, train on the streamed shards; rank 0 logs metrics after each checkpoint and writes the
consolidated ``final/`` checkpoint."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from tasks.core import faults
from tasks.core.identity import atomic_write_text
from tasks.train.stage_plan import (
    REPAIRED,
    StageError,
    StagePlan,
    check_checkpoints,
    loader_from_dict,
    read_metric_rows,
)

log = logging.getLogger(__name__)


def build_model(plan: StagePlan) -> Any:
    """The stage's model: random init, a VLM checkpoint, or a VLM around a language-model checkpoint."""
    import torch

    import model as mvlm
    from model.checkpoint import load_config, read_state_dict
    from model.tokenizer import load_tokenizer

    stage = plan.stage
    torch.manual_seed(stage["seed"])
    vocab = len(load_tokenizer(plan.tokenizer_path))
    if plan.init["kind"] == "scratch":
        return mvlm.build(stage["model"], vocab_size=vocab)
    path = plan.init["path"]
    if load_config(path).is_multimodal:
        return mvlm.load(path)
    vlm = mvlm.build(stage["model"], vocab_size=vocab)
    state = read_state_dict(path)
    missing, unexpected = vlm.load_state_dict(state, strict=False)
    wrong = [k for k in missing if not k.startswith(("model.vision_tower.", "model.mm_projector."))]
    if wrong or unexpected:
        raise StageError(
            f"language-model checkpoint {path} does not fit {stage['model']}: {wrong[:5]} {unexpected[:5]}"
        )
    return vlm


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry point: DeepSpeed engine, resume, loop, consolidated checkpoint."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import ray.train

    from model.lora import apply_lora
    from model.train import LoopConfig, LoopState, load_checkpoint, make_optimizer, run_loop, set_trainable
    from tasks.train.loader import batches

    plan = StagePlan(**config)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    stage = plan.stage
    model = build_model(plan)
    trainable = set_trainable(model, tuple(stage["train"]), lora=bool(stage["lora"]))
    if stage["lora"]:
        lora = stage["lora"]
        apply_lora(model, lora["r"], lora["alpha"], lora["dropout"], tuple(lora["targets"]))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if stage["grad_checkpointing"]:
        model.gradient_checkpointing_enable()
    optim = stage["optim"]
    warmup = optim["warmup_steps"] or int(optim["warmup_ratio"] * plan.total_steps)
    llm_params = sum(p.numel() for n, p in model.named_parameters() if "vision_tower" not in n)
    cfg = LoopConfig(
        total_steps=plan.total_steps,
        grad_accum=stage["global_batch"] // (world * stage["micro_batch"]),
        checkpoint_every=stage["checkpoint_every"],
        lr=optim["lr"],
        part_lrs={part: optim[f"{part}_lr"] for part in ("projector", "vision") if optim.get(f"{part}_lr")},
        min_lr=optim["min_lr"],
        warmup_steps=warmup,
        weight_decay=optim["weight_decay"],
        betas=tuple(optim["betas"]),
        trainable_params=llm_params,
        peak_flops=stage["peak_flops"],
        kill_at_step=plan.kill_at_step,
        nan_at_step=plan.nan_at_step,
    )
    optimizer, scheduler = make_optimizer(model, cfg)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=plan.deepspeed,
        dist_init_required=False,
    )
    ckpt_dir = plan.out / "checkpoints"
    if rank == 0:
        if (marker := plan.out / REPAIRED).exists():
            marker.unlink()  # the driver repaired the checkpoints just before this first start
        else:  # a Ray Train restart (max_failures): a node lost mid-save may have left `latest` on
            check_checkpoints(plan)  # an incomplete tag
    torch.distributed.barrier()
    state = load_checkpoint(engine, ckpt_dir) or LoopState()
    loader_cfg = loader_from_dict(plan.loader)
    sink = _MetricSink(plan, state.step) if rank == 0 else (lambda rows: None)
    log.info(
        "rank %d/%d: %d trainable params, steps %d..%d", rank, world, trainable, state.step, plan.total_steps
    )
    state = run_loop(
        engine, lambda pos: batches(loader_cfg, rank, world, pos, stage["loader_workers"]),
        cfg, state, ckpt_dir, sink, world, faults.hit,
    )  # fmt: skip
    if rank == 0:
        _save_final(engine.module, plan)


class _MetricSink:
    """Rank 0: append metric rows to metrics.jsonl and MLflow, each step exactly once."""

    def __init__(self, plan: StagePlan, resumed_step: int) -> None:
        from tasks.lineage import tracking

        self.path = plan.out / "metrics.jsonl"
        self.run_id = plan.mlflow_run_id
        self.mlflow = tracking.client(plan.mlflow_uri) if plan.mlflow_run_id else None
        self.logged = tracking.last_logged_step(self.mlflow, self.run_id) if self.mlflow else -1
        rows = read_metric_rows(self.path)
        kept = [r for r in rows if r["step"] <= resumed_step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def __call__(self, rows: list[dict[str, float]]) -> None:
        from tasks.lineage import tracking

        with self.path.open("a") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in rows)
        if self.mlflow:
            self.logged = tracking.log_metrics(self.mlflow, self.run_id, rows, self.logged)
        faults.hit("metrics-push")


def _save_final(module: Any, plan: StagePlan) -> None:
    from model.checkpoint import save_checkpoint
    from model.lora import merge_lora
    from model.tokenizer import load_tokenizer

    merge_lora(module)
    save_checkpoint(module, plan.out / "final", tokenizer=load_tokenizer(plan.tokenizer_path))
    faults.hit("stage-final")
