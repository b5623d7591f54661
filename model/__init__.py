"""MobileVLM in PyTorch: named configurations, modules, checkpoints.

Public entry points: ``build(name, **overrides)``, ``save(module, path)``, ``load(path)``, ``info(name)`` and
``config_names()``. Heavy imports happen inside the functions so ``import model`` stays cheap.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.config import AnyConfig, VLMConfig, config_names, get_config

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["build", "config_names", "get_config", "info", "load", "save"]


def build(
    name: str, device: str | torch.device | None = None, dtype: torch.dtype | None = None, **overrides: Any
) -> nn.Module:
    """Build the module of config row ``name`` (any device, ``meta`` included).

    Language-model and VLM rows give a ``MobileLlamaForCausalLM``; vision rows a ``CLIPVisionTower``.
    """
    import torch

    row = get_config(name, **overrides)
    with torch.device(device or "cpu"):
        module = _module_for(row)
    return module.to(dtype) if dtype is not None else module


def _module_for(row: AnyConfig) -> nn.Module:
    from model.config import VisionConfig
    from model.mobilevlm import MobileLlamaForCausalLM, hf_config
    from model.vision import CLIPVisionTower

    if isinstance(row, VisionConfig):
        return CLIPVisionTower(row)
    return MobileLlamaForCausalLM(hf_config(row))


def save(module: nn.Module, path: str | Path, tokenizer: Any | None = None) -> Path:
    """Write ``module`` (and its tokenizer) as a checkpoint directory (config.json + safetensors)."""
    from model.checkpoint import save_checkpoint

    return save_checkpoint(module, path, tokenizer=tokenizer)


def load(path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """Load a checkpoint directory written by ``save(module, path)`` (or the authors' layout)."""
    from model.checkpoint import load_checkpoint

    return load_checkpoint(path, device=device, dtype=dtype)


def info(name: str, **overrides: Any) -> dict[str, Any]:
    """Parameter counts and shapes of a row, computed on the ``meta`` device."""
    row = get_config(name, **overrides)
    module = build(name, device="meta", **overrides)
    counts = {"llm": 0, "vision": 0, "projector": 0}
    for key, param in module.named_parameters():
        counts[part_of(key)] += param.numel()
    counts["total"] = sum(counts.values())
    kind = config_names()[name]
    llm = row.llm if isinstance(row, VLMConfig) else (row if kind == "llm" else None)
    vision = row.vision if isinstance(row, VLMConfig) else (row if kind == "vision" else None)
    tokens = row.visual_tokens if isinstance(row, VLMConfig) else (vision.num_tokens if vision else 0)
    return {
        "name": name,
        "kind": kind,
        "params": counts,
        "visual_tokens": tokens,
        "projector": row.projector if isinstance(row, VLMConfig) else None,
        "llm": _shape(llm) if llm else None,
        "vision": _shape(vision) if vision else None,
        "hub_id": row.hub_id,
    }


def part_of(key: str) -> str:
    """Which part a parameter or state-dict key belongs to: ``vision``, ``projector`` or ``llm``."""
    if "vision_tower." in key or key.startswith("vision_tower"):
        return "vision"
    return "projector" if "mm_projector." in key else "llm"


def _shape(row: Any) -> dict[str, Any]:

    return {k: v for k, v in dataclasses.asdict(row).items() if k not in ("name", "hub_id")}
