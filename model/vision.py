"""CLIP vision tower: transformers' ``CLIPVisionModel`` with LLaVA's feature selection."""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from model.config import VisionConfig


def clip_config(cfg: VisionConfig) -> CLIPVisionConfig:
    """The transformers config for a vision row."""
    return CLIPVisionConfig(
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        projection_dim=cfg.projection_dim,
        hidden_act=cfg.hidden_act,
        layer_norm_eps=cfg.layer_norm_eps,
    )


def vision_row_from_clip(clip: dict, name: str, select_layer: int, select_feature: str) -> VisionConfig:
    """A vision row from a saved ``CLIPVisionConfig`` dict (the ``vision_config`` checkpoint key)."""
    return VisionConfig(
        name=name,
        n_layer=clip["num_hidden_layers"],
        hidden=clip["hidden_size"],
        n_head=clip["num_attention_heads"],
        intermediate=clip["intermediate_size"],
        image_size=clip["image_size"],
        patch_size=clip["patch_size"],
        projection_dim=clip.get("projection_dim", 768),
        hidden_act=clip.get("hidden_act", "quick_gelu"),
        layer_norm_eps=clip.get("layer_norm_eps", 1e-5),
        select_layer=select_layer,
        select_feature=select_feature,  # type: ignore[arg-type]
    )


class _CLIPHolder(nn.Module):
    """Holds the CLIP model as ``vision_model``: transformers 5 flattened ``CLIPVisionModel``, and
    released checkpoints name its weights ``vision_model.*``."""

    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.vision_model = CLIPVisionModel(config)

    def forward(self, pixel_values: torch.Tensor, **kwargs):
        return self.vision_model(pixel_values, **kwargs)


class CLIPVisionTower(nn.Module):
    """Image -> patch features from hidden layer ``select_layer`` (CLS dropped for ``patch``).

    The attribute ``vision_tower`` holds the CLIP model so that state_dict keys read
    ``vision_tower.vision_model.*`` as in LLaVA and MobileVLM checkpoints.
    """

    def __init__(self, cfg: VisionConfig, frozen: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision_tower = _CLIPHolder(clip_config(cfg))
        self.frozen = frozen
        if frozen:
            self.vision_tower.requires_grad_(False)

    @property
    def num_tokens(self) -> int:
        """Feature tokens per image."""
        return self.cfg.num_tokens

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised pixels -> (N, tokens, hidden) features."""
        expected = (3, self.cfg.image_size, self.cfg.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"vision tower {self.cfg.name} expects images of shape (N, {expected}), "
                f"got {tuple(images.shape)}"
            )
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            out = self.vision_tower(images.to(self.dtype), output_hidden_states=True)
        features = out.hidden_states[self.cfg.select_layer]
        return features[:, 1:] if self.cfg.select_feature == "patch" else features

    @property
    def dtype(self) -> torch.dtype:
        """Parameter dtype of the tower."""
        return self.vision_tower.vision_model.embeddings.patch_embedding.weight.dtype
