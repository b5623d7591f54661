"""Vision-to-language projectors in plain torch: LDP (v1), LDPv2 and LLaVA's mlp2x_gelu.

Module attribute names reproduce the authors' released state_dict layout exactly (see
``shared/reference/mobilevlm-facts.md``), so their checkpoints load with ``strict=True``:
LDP v1 is torchvision's MobileNetV3 ``InvertedResidual`` (no expansion) with timm's
``LayerNormAct2d`` as the norm, rewritten here without either library.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _tokens_to_grid(x: torch.Tensor) -> torch.Tensor:
    """(B, N, C) tokens on a square grid -> (B, C, H, W)."""
    b, n, c = x.shape
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"LDP needs a square patch grid, got {n} tokens (select_feature must be 'patch')")
    return x.transpose(1, 2).reshape(b, c, side, side)


def _grid_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C)."""
    return x.flatten(2).transpose(1, 2)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (timm's ``LayerNormAct2d`` with no activation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def _conv_norm(channels: int, kernel: int, stride: int, groups: int, act: nn.Module | None) -> nn.Sequential:
    """Conv (no bias) + LayerNorm2d (+ activation); indices as torchvision's Conv2dNormActivation."""
    layers: list[nn.Module] = [
        nn.Conv2d(channels, channels, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        LayerNorm2d(channels, eps=1e-5),
    ]
    if act is not None:
        layers.append(act)
    return nn.Sequential(*layers)


def _make_divisible(value: float, divisor: int = 8) -> int:
    """torchvision's channel rounding for squeeze-excite widths."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: avg pool, 1x1 conv + ReLU, 1x1 conv + Hardsigmoid, rescale."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        squeeze = _make_divisible(channels // 4)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = F.adaptive_avg_pool2d(x, 1)
        scale = F.hardsigmoid(self.fc2(F.relu(self.fc1(scale))))
        return scale * x


class InvertedResidual(nn.Module):
    """MobileNetV3 block without expansion: depthwise 3x3 + LN + Hardswish, SE, pointwise 1x1 + LN."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            _conv_norm(channels, 3, stride, channels, nn.Hardswish()),
            SqueezeExcite(channels),
            _conv_norm(channels, 1, 1, 1, None),
        )
        self.use_residual = stride == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.use_residual else out


class LDPBlock(nn.Module):
    """LDP v1 body: token MLP, then two inverted residual blocks (stride 1, stride 2) on the grid."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Identity(), nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim)
        )
        self.mb_block = nn.Sequential(
            nn.Identity(), InvertedResidual(out_dim, 1), InvertedResidual(out_dim, 2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _grid_to_tokens(self.mb_block(_tokens_to_grid(self.mlp(x))))


class LDPNetProjector(nn.Module):
    """MobileVLM's lightweight downsample projector (v1): 576 tokens -> 144 for CLIP-L/336."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.model = LDPBlock(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class _FeatureMLP(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class _PositionInjection(nn.Module):
    """PEG: depthwise 3x3 conv with bias, plus residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.peg = nn.Sequential(nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = _tokens_to_grid(x)
        return _grid_to_tokens(self.peg(grid) + grid)


class LDPNetV2Projector(nn.Module):
    """MobileVLM V2 projector: MLP, average pool to half the grid side, PEG."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = _FeatureMLP(in_dim, out_dim)
        self.peg = _PositionInjection(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = _tokens_to_grid(self.mlp(x))
        side = grid.shape[-1] // 2
        return self.peg(_grid_to_tokens(F.adaptive_avg_pool2d(grid, (side, side))))


def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """The projector ``kind`` mapping vision width ``in_dim`` to language width ``out_dim``."""
    if kind == "ldpnet":
        return LDPNetProjector(in_dim, out_dim)
    if kind == "ldpnetv2":
        return LDPNetV2Projector(in_dim, out_dim)
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
    raise ValueError(f"unknown projector type {kind!r}; known: ldpnet, ldpnetv2, mlp2x_gelu")
