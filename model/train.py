"""Train one stage: trainable parts, optimizer and schedule, the DeepSpeed step loop, checkpoints.

Torch and DeepSpeed only: data comes as an iterator of batches, metrics leave through a callback,
and the orchestration (Ray Train, MLflow) lives in ``tasks/``.
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


@dataclass(frozen=True)
class LoopConfig:
    """What the step loop needs (a projection of the recipe stage)."""

    total_steps: int
    """Optimizer steps in the stage."""
    grad_accum: int
    """Micro-batches per optimizer step."""
    checkpoint_every: int
    """Optimizer steps between checkpoints."""
    lr: float
    """Peak learning rate."""
    min_lr: float
    """Final learning rate of the cosine."""
    warmup_steps: int
    """Linear warmup steps."""
    weight_decay: float
    """AdamW weight decay (not applied to norms, biases and embeddings-free 1-D params)."""
    betas: tuple[float, float]
    """AdamW betas."""
    part_lrs: dict[str, float] = field(default_factory=dict)
    """Peak learning rates of parts (``projector``, ``vision``) that do not train at ``lr``."""
    trainable_params: int = 0
    """Parameters that train (for MFU: 6 x params x tokens/s)."""
    peak_flops: float | None = None
    """Peak FLOP/s per worker; MFU is reported when set."""
    kill_at_step: int | None = None
    """Chaos testing: the process exits abruptly (as if SIGKILLed) after this optimizer step."""
    nan_at_step: int | None = None
    """Chaos testing: the loss of this optimizer step becomes NaN."""
    keep_checkpoints: int = 2
    """DeepSpeed checkpoints kept (the newest ones); older ones are deleted after each save."""


@dataclass
class LoopState:
    """Resumable state besides model and optimizer (DeepSpeed client state)."""

    step: int = 0
    """Optimizer steps done."""
    loader: dict[str, Any] = field(default_factory=dict)
    """Data loader position."""
    rng: dict[str, Any] = field(default_factory=dict)
    """Python, numpy and torch RNG states."""


def set_trainable(model: nn.Module, parts: tuple[str, ...], lora: bool = False) -> int:
    """Freeze everything, then unfreeze ``parts`` (``llm``, ``projector``, ``vision``); the vision tower
    stays frozen unless ``vision`` is named. With ``lora`` the language model's own weights (embeddings,
    layers, ``lm_head``) stay frozen: it trains only through the adapters added afterwards, as the
    authors' LoRA runs do (their projector trains beside the adapters)."""
    model.requires_grad_(False)
    inner = model.model
    if hasattr(inner, "vision_tower"):
        inner.vision_tower.frozen = "vision" not in parts
        inner.vision_tower.requires_grad_("vision" in parts)
    elif "vision" in parts:
        raise ValueError("stage trains the vision tower but the model has none (use a VLM config row)")
    if "projector" in parts:
        if not hasattr(inner, "mm_projector"):
            raise ValueError("stage trains the projector but the model has none (use a VLM config row)")
        inner.mm_projector.requires_grad_(True)
    if "llm" in parts and not lora:
        for name, module in inner.named_children():
            if name not in ("vision_tower", "mm_projector"):
                module.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def cosine_schedule(step: int, cfg: LoopConfig) -> float:
    """Learning-rate multiplier: linear warmup, then cosine from lr to min_lr."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.min_lr / cfg.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, cfg: LoopConfig) -> list[dict[str, Any]]:
    """Trainable parameters by part (``llm``, ``projector``, ``vision``; LoRA adapters are ``llm``), each
    at its peak rate, split into decayed (2-D and up) and undecayed (norms, biases) groups; every group
    is named ``part`` or ``part/no_decay``."""
    from model import part_of

    groups: dict[str, dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = part_of(name)
        decayed = param.dim() >= 2
        key = part if decayed else f"{part}/no_decay"
        if key not in groups:
            lr, decay = cfg.part_lrs.get(part, cfg.lr), cfg.weight_decay if decayed else 0.0
            groups[key] = {"name": key, "params": [], "lr": lr, "weight_decay": decay}
        groups[key]["params"].append(param)
    return list(groups.values())


def make_optimizer(model: nn.Module, cfg: LoopConfig) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over ``param_groups`` and its warmup-cosine scheduler (one multiplier for every group, so
    each part's rate keeps its ratio to ``lr``)."""
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=cfg.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_schedule(s, cfg))
    return optimizer, scheduler


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as lists, ints, floats and a tensor, so that a checkpoint
    holding them loads with ``torch.load(weights_only=True)``."""
    version, internal, gauss = random.getstate()
    name, key, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [str(name), key.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore ``rng_state()`` output (also the older tuple/ndarray form)."""
    if state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        name, key, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])


def save_checkpoint(
    engine: Any, ckpt_dir: Path, state: LoopState, keep: int = 2, fault: Callable[[str], None] | None = None
) -> None:
    """DeepSpeed checkpoint ``step-N`` with the loop state as client state (every rank calls this);
    rank 0 then deletes all but the newest ``keep`` checkpoints. ``fault`` (chaos testing) is called
    with ``"checkpoint-file"`` after each file DeepSpeed writes."""
    state.rng = rng_state()
    writer = getattr(engine, "checkpoint_engine", None)
    if fault is not None and writer is not None:
        inner = writer.save

        def save(*args: Any, **kwargs: Any) -> Any:
            out = inner(*args, **kwargs)
            fault("checkpoint-file")
            return out

        writer.save = save
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=f"step-{state.step}", client_state={"loop": state.__dict__})
    finally:
        if fault is not None and writer is not None:
            del writer.save  # back to the class's method
    if getattr(engine, "global_rank", 0) == 0:
        prune_checkpoints(ckpt_dir, keep)


def prune_checkpoints(ckpt_dir: Path, keep: int) -> list[Path]:
    """Delete ``step-N`` folders beyond the newest ``keep``; returns what was deleted."""

    steps = sorted((p for p in Path(ckpt_dir).glob("step-*") if p.is_dir()), key=lambda p: int(p.name[5:]))
    old = steps[: max(0, len(steps) - max(keep, 1))]
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return old


def load_checkpoint(engine: Any, ckpt_dir: Path) -> LoopState | None:
    """Resume from the latest DeepSpeed checkpoint in ``ckpt_dir``, if any, never unpickling code.

    Every file is read with ``torch.load(weights_only=True)`` (``model.ds_checkpoint``); a file that
    needs more raises UnsafeCheckpointError. The driver checks and repairs the checkpoints before the
    ranks start (``model.ds_checkpoint.repair_checkpoints``), so this only loads.
    """
    from model.ds_checkpoint import safe_load_engine

    if not (ckpt_dir / "latest").is_file():
        return None
    safe_load_engine(engine)
    path, client = engine.load_checkpoint(str(ckpt_dir))
    if path is None:
        return None
    state = LoopState(**client["loop"])
    set_rng_state(state.rng)
    log.info("resumed from %s at step %d", path, state.step)
    return state


def run_loop(
    engine: Any,
    batches: Callable[[dict[str, Any]], Iterator[tuple[dict[str, Any], dict[str, Any]]]],
    cfg: LoopConfig,
    state: LoopState,
    ckpt_dir: Path,
    on_metrics: Callable[[list[dict[str, float]]], None],
    world_size: int = 1,
    fault: Callable[[str], None] | None = None,
) -> LoopState:
    """Train from ``state.step`` to ``cfg.total_steps``.

    ``batches(position)`` yields ``(batch, position_after)`` from a loader position. Metrics are
    buffered and handed to ``on_metrics`` just before each checkpoint; the sink drops rows past the
    checkpoint it resumes from, so every step is reported exactly once. A non-finite loss raises
    NonFiniteLossError before anything is saved. ``fault`` (chaos testing, ``tasks.core.faults.hit``) is
    called with ``"train-step"`` inside every optimizer step and passed on to ``save_checkpoint``.
    """
    stream = batches(state.loader)
    buffer: list[dict[str, float]] = []
    while state.step < cfg.total_steps:
        started = time.perf_counter()
        losses, tokens, samples, wait, skipped = [], 0, 0, 0.0, 0
        for _ in range(cfg.grad_accum):
            t0 = time.perf_counter()
            batch, state.loader = next(stream)
            wait += time.perf_counter() - t0
            skipped = int(batch.pop("skipped_samples", 0))
            loss = engine(**batch).loss
            if cfg.nan_at_step == state.step + 1:
                loss = loss * float("nan")
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"loss is {loss.item()} at step {state.step + 1}; last good checkpoint kept"
                )
            engine.backward(loss)
            engine.step()
            if fault is not None:
                fault("train-step")
            losses.append(loss.item())
            tokens += (
                int(batch["attention_mask"].sum())
                if "attention_mask" in batch
                else batch["input_ids"].numel()
            )
            samples += len(batch["input_ids"])
        state.step += 1
        if cfg.kill_at_step is not None and state.step == cfg.kill_at_step:
            os._exit(137)
        elapsed = time.perf_counter() - started
        row = _metrics(
            engine, state.step, losses, tokens * world_size, samples * world_size, elapsed, wait, cfg
        )
        buffer.append(row | {"skipped_samples": skipped})
        if state.step % cfg.checkpoint_every == 0 or state.step == cfg.total_steps:
            on_metrics(buffer)  # before the checkpoint: a crash in between is trimmed on resume
            save_checkpoint(engine, ckpt_dir, state, cfg.keep_checkpoints, fault)
            buffer = []
    return state


def _part_lrs(engine: Any) -> dict[str, float]:
    """``lr/<part>`` of every part when more than one part trains (``lr`` is the first group's)."""
    groups = [g for g in engine.optimizer.param_groups if "/" not in g.get("name", "/")]
    return {f"lr/{g['name']}": g["lr"] for g in groups} if len(groups) > 1 else {}


def _metrics(engine: Any, step: int, losses: list[float], tokens: int, samples: int, elapsed: float,
             wait: float, cfg: LoopConfig) -> dict[str, float]:  # fmt: skip
    tok_s = tokens / elapsed
    norm = engine.get_global_grad_norm()
    out = {
        "step": step,
        "loss": sum(losses) / len(losses),
        "lr": engine.get_lr()[0],
        **_part_lrs(engine),
        "grad_norm": float(norm) if norm is not None else float("nan"),
        "tokens_per_s": tok_s,
        "samples_per_s": samples / elapsed,
        "data_wait_fraction": wait / elapsed,
    }
    if cfg.peak_flops:
        out["mfu"] = 6 * cfg.trainable_params * tok_s / cfg.peak_flops
    return out
