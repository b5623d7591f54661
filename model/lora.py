"""LoRA adapters for the language model's linear layers, in plain torch (no peft).

Adapters wrap ``nn.Linear`` modules in place; ``merge_lora`` folds them back into the base weights
so checkpoints keep the standard layout.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LoRALinear(nn.Module):
    """``base(x) + (alpha / r) * B(A(dropout(x)))`` with B initialised to zero."""

    def __init__(self, base: nn.Linear, r: int, alpha: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.scale = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(
            base.in_features, r, bias=False, device=base.weight.device, dtype=base.weight.dtype
        )
        self.lora_B = nn.Linear(
            r, base.out_features, bias=False, device=base.weight.device, dtype=base.weight.dtype
        )
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * self.lora_B(self.lora_A(self.dropout(x)))


def apply_lora(model: nn.Module, r: int, alpha: int, dropout: float, targets: tuple[str, ...]) -> int:
    """Wrap every ``nn.Linear`` named in ``targets`` inside ``model.model.layers``; returns how many."""
    count = 0
    for layer in model.model.layers:
        for parent in layer.modules():
            for name, child in list(parent.named_children()):
                if name in targets and isinstance(child, nn.Linear):
                    setattr(parent, name, LoRALinear(child, r, alpha, dropout))
                    count += 1
    if count == 0:
        raise ValueError(f"no linear layer named {targets} found for LoRA")
    return count


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold adapters into their base weights and unwrap them; returns how many were merged."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                child.base.weight += child.scale * (child.lora_B.weight @ child.lora_A.weight)
                setattr(parent, name, child.base)
                count += 1
    return count
