"""MobileLLaMA and MobileVLM as transformers modules.

``MobileLlamaForCausalLM`` is transformers' ``LlamaForCausalLM`` whose inner model optionally carries
a CLIP vision tower and a projector, named as in the authors' checkpoints
(``model.vision_tower.vision_tower.vision_model.*``, ``model.mm_projector.*``). Without a vision
tower it is exactly MobileLLaMA (a LLaMA with untied embeddings).
"""

from __future__ import annotations

from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.models.llama.modeling_llama import LlamaPreTrainedModel

from model.config import LLMConfig, VisionConfig, VLMConfig, vision_by_hub_id
from model.conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from model.projector import build_projector
from model.vision import CLIPVisionTower, clip_config, vision_row_from_clip


@strict
class MobileVLMConfig(LlamaConfig):
    """LLaMA config plus the LLaVA/MobileVLM multimodal keys (``mm_*``) of released checkpoints."""

    model_type = "mobilevlm"
    mm_vision_tower: str | None = None
    mm_projector_type: str | None = None
    mm_hidden_size: int | None = None
    mm_vision_select_layer: int = -2
    mm_vision_select_feature: str = "patch"
    image_aspect_ratio: str = "pad"
    vision_config: dict | None = None
    tokenizer_padding_side: str = "right"
    tokenizer_model_max_length: int | None = None
    mvlm_name: str | None = None
    # Keys the authors' code reads (mobilevlm/train/train.py writes them, load_pretrained_model and
    # build_vision_tower read them), so that their loader opens our checkpoints.
    vision_tower_type: str | None = None
    use_mm_proj: bool | None = None
    mm_use_im_start_end: bool = False
    mm_use_im_patch_token: bool = False
    tune_mm_mlp_adapter: bool = False
    freeze_mm_mlp_adapter: bool = False
    image_grid_pinpoints: list | None = None
    mm_projector_lr: float | None = None
    max_sequence_length: int | None = None

    @property
    def is_multimodal(self) -> bool:
        """True when the model has a vision tower and projector."""
        return self.mm_vision_tower is not None


def hf_config(row: LLMConfig | VLMConfig) -> MobileVLMConfig:
    """The transformers config of a language-model or VLM row."""
    llm = row.llm if isinstance(row, VLMConfig) else row
    config = MobileVLMConfig(
        vocab_size=llm.vocab_size,
        hidden_size=llm.hidden,
        intermediate_size=llm.intermediate,
        num_hidden_layers=llm.n_layer,
        num_attention_heads=llm.n_head,
        num_key_value_heads=llm.n_head,
        max_position_embeddings=llm.context,
        rms_norm_eps=llm.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": llm.rope_theta},
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tokenizer_model_max_length=llm.context,
        max_sequence_length=llm.context,
        mvlm_name=row.name,
        architectures=["MobileLlamaForCausalLM"],
    )
    if isinstance(row, VLMConfig):
        vision = row.vision
        config.mm_vision_tower = vision.hub_id or vision.name
        config.mm_projector_type = row.projector
        config.mm_hidden_size = vision.hidden
        config.mm_vision_select_layer = vision.select_layer
        config.mm_vision_select_feature = vision.select_feature
        config.image_aspect_ratio = row.image_aspect_ratio
        config.vision_config = clip_config(vision).to_dict()
        config.vision_tower_type, config.use_mm_proj = "clip", True
    return config


def vision_row(config: MobileVLMConfig) -> VisionConfig:
    """The vision row described by a checkpoint config: ``vision_config`` if saved, else by hub id."""
    layer, feature = config.mm_vision_select_layer, config.mm_vision_select_feature
    if config.vision_config:
        return vision_row_from_clip(config.vision_config, config.mm_vision_tower, layer, feature)
    known = vision_by_hub_id(config.mm_vision_tower)
    if known is None:
        raise ValueError(
            f"config names vision tower {config.mm_vision_tower!r}, which is not in the vision table and "
            "has no 'vision_config' key; add a row to model/config.py VISION_CONFIGS"
        )
    return VisionConfig(**{**known.__dict__, "select_layer": layer, "select_feature": feature})


class MobileLlamaModel(LlamaModel):
    """LlamaModel plus, for a VLM, ``vision_tower`` and ``mm_projector``."""

    config_class = MobileVLMConfig

    def __init__(self, config: MobileVLMConfig) -> None:
        super().__init__(config)
        if config.is_multimodal:
            vision = vision_row(config)
            self.vision_tower = CLIPVisionTower(vision)
            self.mm_projector = build_projector(config.mm_projector_type, vision.hidden, config.hidden_size)


class MobileLlamaForCausalLM(LlamaForCausalLM):
    """MobileLLaMA language model, optionally with MobileVLM's vision tower and projector."""

    config_class = MobileVLMConfig

    def __init__(self, config: MobileVLMConfig) -> None:
        LlamaPreTrainedModel.__init__(self, config)
        self.model = MobileLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        if config.is_multimodal:  # post_init may have touched requires_grad; the tower stays frozen
            self.model.vision_tower.vision_tower.requires_grad_(not self.model.vision_tower.frozen)

    # --- images ---------------------------------------------------------------------------------

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) pixels -> (N, visual_tokens, hidden) embeddings for the language model."""
        if not self.config.is_multimodal:
            raise ValueError(
                f"{self.config.mvlm_name or 'this model'} has no vision tower; it takes no images"
            )
        features = self.model.vision_tower(images)
        projector = self.model.mm_projector
        return projector(features.to(next(projector.parameters()).dtype))

    def splice_images(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None,
        images: torch.Tensor,
        padding_side: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Replace every ``<image>`` (id -200) with that image's visual tokens.

        Images are matched to placeholders in reading order across the batch. Returns
        ``inputs_embeds``, ``attention_mask``, ``position_ids`` and ``labels`` (-100 on visual
        tokens and padding), re-padded on ``padding_side`` (default: the config's).
        """
        mask = (
            torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        )
        placeholders = int((input_ids[mask] == IMAGE_TOKEN_INDEX).sum())
        if placeholders != images.shape[0]:
            raise ValueError(
                f"the batch has {placeholders} <image> placeholder(s) but {images.shape[0]} image(s); "
                "each image needs exactly one <image> in its prompt"
            )
        features = self.encode_images(images) if placeholders else None
        text = self.get_input_embeddings()(input_ids.clamp(min=0))
        pieces = [
            self._splice_one(
                input_ids[b][mask[b]],
                text[b][mask[b]],
                None if labels is None else labels[b][mask[b]],
                features,
                offset,
            )
            for b, offset in zip(range(len(input_ids)), _image_offsets(input_ids, mask), strict=True)
        ]
        return _pad_batch(pieces, padding_side or self.config.tokenizer_padding_side, labels is not None)

    def _splice_one(
        self,
        ids: torch.Tensor,
        text: torch.Tensor,
        labels: torch.Tensor | None,
        features: torch.Tensor | None,
        first_image: int,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        at = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
        bounds = [-1, *at, len(ids)]
        embeds: list[torch.Tensor] = []
        labs: list[torch.Tensor] = []
        for k in range(len(bounds) - 1):
            start, end = bounds[k] + 1, bounds[k + 1]
            embeds.append(text[start:end])
            if labels is not None:
                labs.append(labels[start:end])
            if k < len(at):
                image = features[first_image + k].to(text.dtype)
                embeds.append(image)
                labs.append(torch.full((len(image),), IGNORE_INDEX, dtype=torch.long, device=ids.device))
        limit = self.config.tokenizer_model_max_length or self.config.max_position_embeddings
        out_labels = torch.cat(labs)[:limit] if labels is not None else None
        return torch.cat(embeds)[:limit], out_labels

    # --- forward and generate -------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        images: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        """LLaMA forward; with ``images``, ``<image>`` placeholders in ``input_ids`` are spliced first."""
        if images is not None and inputs_embeds is None:
            inputs_embeds, attention_mask, position_ids, labels = self.splice_images(
                input_ids, attention_mask, labels, images
            )
            input_ids = None
        elif input_ids is not None and bool((input_ids == IMAGE_TOKEN_INDEX).any()):
            raise ValueError("input_ids contain <image> placeholders (-200) but no images were given")
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            labels=labels,
            **kwargs,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Generate new tokens (KV cache on); with images the prompt embeddings are spliced first.

        Returns only the generated tokens when images are given (transformers' convention for
        ``inputs_embeds``); prompt + generated tokens otherwise.
        """
        if images is None:
            return super().generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        embeds, mask, _, _ = self.splice_images(input_ids, attention_mask, None, images, padding_side="left")
        return super().generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)


def _image_offsets(input_ids: torch.Tensor, mask: torch.Tensor) -> list[int]:
    """Index of each sample's first image among all images of the batch."""
    counts = ((input_ids == IMAGE_TOKEN_INDEX) & mask).sum(dim=1).tolist()
    offsets, total = [], 0
    for count in counts:
        offsets.append(total)
        total += count
    return offsets


def _pad_batch(
    pieces: list[tuple[torch.Tensor, torch.Tensor | None]], side: str, with_labels: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Stack variable-length (embeds, labels) into padded tensors with mask and position ids."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    longest = max(len(e) for e, _ in pieces)
    first = pieces[0][0]
    batch, dim = len(pieces), first.shape[-1]
    embeds = first.new_zeros(batch, longest, dim)
    mask = torch.zeros(batch, longest, dtype=torch.long, device=first.device)
    positions = torch.zeros(batch, longest, dtype=torch.long, device=first.device)
    labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long, device=first.device)
    for b, (emb, lab) in enumerate(pieces):
        n = len(emb)
        span = slice(longest - n, longest) if side == "left" else slice(0, n)
        embeds[b, span] = emb
        mask[b, span] = 1
        positions[b, span] = torch.arange(n, device=first.device)
        if lab is not None:
            labels[b, span] = lab
    return embeds, mask, positions, labels if with_labels else None
