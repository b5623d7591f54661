"""Named model configurations: one row per size, as tables.

Adding a model is adding a row. The shapes of the real rows come from the MobileVLM paper
(arXiv 2312.16886), the authors' released checkpoints (``mtgv/*`` on the Hugging Face hub) and
OpenAI's CLIP ViT-L/14-336 config; see ``shared/reference/mobilevlm-facts.md``. The tiny rows are
ours, small enough for CPU tests in seconds.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

ProjectorType = Literal["ldpnet", "ldpnetv2", "mlp2x_gelu"]
SelectFeature = Literal["patch", "cls_patch"]
AspectMode = Literal["pad", "resize_crop"]
PROJECTOR_TYPES: tuple[str, ...] = ("ldpnet", "ldpnetv2", "mlp2x_gelu")


@dataclass(frozen=True)
class LLMConfig:
    """Shape of a LLaMA-architecture language model (MobileLLaMA)."""

    name: str
    """Row name, e.g. ``mobilellama-1.4b``."""
    n_layer: int
    """Number of transformer blocks."""
    hidden: int
    """Model width (embedding and residual stream size)."""
    n_head: int
    """Attention heads (MobileLLaMA uses no grouped-query attention: kv heads = heads)."""
    intermediate: int
    """SwiGLU feed-forward width."""
    vocab_size: int = 32000
    """Tokenizer vocabulary size (LLaMA-2 SentencePiece has 32000)."""
    context: int = 2048
    """Maximum sequence length (positions)."""
    rms_norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    hub_id: str | None = None
    """Where the released weights live, for users whose machines reach the hub."""

    def validate(self) -> None:
        """Raise ValueError when the shape cannot form a model."""
        if self.hidden % self.n_head:
            raise ValueError(f"{self.name}: hidden={self.hidden} is not divisible by n_head={self.n_head}")
        for field in ("n_layer", "hidden", "n_head", "intermediate", "vocab_size", "context"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{self.name}: {field} must be positive, got {getattr(self, field)}")


@dataclass(frozen=True)
class VisionConfig:
    """Shape of a CLIP ViT vision tower and how its features are selected."""

    name: str
    """Row name, e.g. ``clip-vit-l-14-336``."""
    n_layer: int
    """Number of encoder layers."""
    hidden: int
    """Encoder width (``mm_hidden_size`` of the projector input)."""
    n_head: int
    """Attention heads."""
    intermediate: int
    """MLP width."""
    image_size: int
    """Input resolution in pixels (square)."""
    patch_size: int
    """Patch size in pixels."""
    projection_dim: int = 768
    """CLIP projection width (unused by MobileVLM, kept so released weights load)."""
    hidden_act: str = "quick_gelu"
    """Activation of the MLP (OpenAI CLIP uses quick_gelu)."""
    layer_norm_eps: float = 1e-5
    """LayerNorm epsilon."""
    select_layer: int = -2
    """Hidden state used as image features (-2: penultimate layer, as LLaVA and MobileVLM)."""
    select_feature: SelectFeature = "patch"
    """``patch`` drops the CLS token; ``cls_patch`` keeps it."""
    hub_id: str | None = None
    """Hub id of the released weights (``mm_vision_tower`` in checkpoint configs)."""

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def feature_layer(self) -> int:
        """Non-negative hidden-state index of the features (0 = embeddings), as llama.cpp counts."""
        return self.select_layer if self.select_layer >= 0 else self.n_layer + self.select_layer + 1

    @property
    def num_tokens(self) -> int:
        """Feature tokens per image after selection."""
        return self.grid**2 + (1 if self.select_feature == "cls_patch" else 0)

    def validate(self) -> None:
        """Raise ValueError when the shape cannot form a model."""
        if self.image_size % self.patch_size:
            raise ValueError(
                f"{self.name}: image_size={self.image_size} is not a multiple of patch_size={self.patch_size}"
            )
        if self.hidden % self.n_head:
            raise ValueError(f"{self.name}: hidden={self.hidden} is not divisible by n_head={self.n_head}")
        if not -self.n_layer - 1 <= self.select_layer <= self.n_layer:
            raise ValueError(f"{self.name}: select_layer={self.select_layer} is outside 0..{self.n_layer}")


@dataclass(frozen=True)
class VLMConfig:
    """A MobileVLM: language model + vision tower + projector, by row names."""

    name: str
    """Row name, e.g. ``mobilevlm-1.7b``."""
    llm: LLMConfig
    """The language model row."""
    vision: VisionConfig
    """The vision tower row."""
    projector: ProjectorType = "ldpnet"
    """Projector type: ``ldpnet`` (LDP v1), ``ldpnetv2`` (MobileVLM V2) or ``mlp2x_gelu`` (LLaVA-1.5)."""
    image_aspect_ratio: AspectMode = "pad"
    """Image preprocessing: ``pad`` to square with the mean colour (LLaVA), or ``resize_crop`` (CLIP)."""
    hub_id: str | None = None
    """Hub id of the released checkpoint."""

    @property
    def visual_tokens(self) -> int:
        """Tokens per image that reach the language model."""
        return projected_tokens(self.projector, self.vision.num_tokens)

    def validate(self) -> None:
        """Raise ValueError when the composition cannot work."""
        self.llm.validate()
        self.vision.validate()
        if self.projector not in PROJECTOR_TYPES:
            raise ValueError(f"{self.name}: unknown projector {self.projector!r}; known: {PROJECTOR_TYPES}")
        if self.projector != "mlp2x_gelu" and self.vision.select_feature != "patch":
            raise ValueError(
                f"{self.name}: {self.projector} needs a square patch grid; select_feature must be 'patch'"
            )


def projected_tokens(projector: str, num_tokens: int) -> int:
    """Visual tokens out of a projector given ``num_tokens`` in (LDP halves each side of the grid)."""
    if projector == "mlp2x_gelu":
        return num_tokens
    grid = math.isqrt(num_tokens)
    if grid * grid != num_tokens:
        raise ValueError(f"{projector} needs a square patch grid, got {num_tokens} tokens")
    out = (grid + 1) // 2 if projector == "ldpnet" else grid // 2
    return out * out


# --- the tables ------------------------------------------------------------------------------

LLM_CONFIGS: dict[str, LLMConfig] = {
    c.name: c
    for c in [
        # MobileLLaMA, paper Table 1 and mtgv/MobileLLaMA-*-Base config.json.
        LLMConfig("mobilellama-1.4b", 24, 2048, 16, 5632, hub_id="mtgv/MobileLLaMA-1.4B-Base"),
        LLMConfig("mobilellama-2.7b", 32, 2560, 32, 6912, hub_id="mtgv/MobileLLaMA-2.7B-Base"),
        # Ours: CPU tests and the tiny profile.
        LLMConfig("tiny-llama", 2, 64, 4, 176, vocab_size=1024, context=1024),
        # Ours: widths that are multiples of 256, so llama.cpp's K-quants (q4_k_s) quantize real blocks.
        LLMConfig("tiny-llama-256", 2, 256, 4, 512, vocab_size=1024, context=1024),
    ]
}

VISION_CONFIGS: dict[str, VisionConfig] = {
    c.name: c
    for c in [
        # openai/clip-vit-large-patch14-336 config.json (vision part).
        VisionConfig(
            "clip-vit-l-14-336", 24, 1024, 16, 4096, 336, 14, hub_id="openai/clip-vit-large-patch14-336"
        ),
        # Ours: 56 px images, 14 px patches -> 16 tokens (4 after LDP).
        VisionConfig("tiny-vit", 2, 32, 2, 64, 56, 14, projection_dim=32),
        # Ours: CLIP-L/14-336 geometry (336 px, 24x24 patch grid -> 144 tokens after LDP) at tiny width;
        # llama.cpp's LDP graph assumes a 24x24 grid, so GGUF/mmproj tests use this row.
        VisionConfig("tiny-vit-336", 2, 32, 2, 64, 336, 14, projection_dim=32),
    ]
}

_CLIP = VISION_CONFIGS["clip-vit-l-14-336"]
VLM_CONFIGS: dict[str, VLMConfig] = {
    c.name: c
    for c in [
        # MobileVLM v1 (paper) and V2 (LDPv2) releases.
        VLMConfig("mobilevlm-1.7b", LLM_CONFIGS["mobilellama-1.4b"], _CLIP, hub_id="mtgv/MobileVLM-1.7B"),
        VLMConfig("mobilevlm-3b", LLM_CONFIGS["mobilellama-2.7b"], _CLIP, hub_id="mtgv/MobileVLM-3B"),
        VLMConfig(
            "mobilevlm-v2-1.7b",
            LLM_CONFIGS["mobilellama-1.4b"],
            _CLIP,
            "ldpnetv2",
            hub_id="mtgv/MobileVLM_V2-1.7B",
        ),
        VLMConfig(
            "mobilevlm-v2-3b",
            LLM_CONFIGS["mobilellama-2.7b"],
            _CLIP,
            "ldpnetv2",
            hub_id="mtgv/MobileVLM_V2-3B",
        ),
        # Ours.
        VLMConfig("mobilevlm-tiny", LLM_CONFIGS["tiny-llama"], VISION_CONFIGS["tiny-vit"]),
        # Ours: tiny rows that llama.cpp's mmproj path (LDP / LDPv2 on a 24x24 grid) can run.
        VLMConfig("mobilevlm-tiny-336", LLM_CONFIGS["tiny-llama"], VISION_CONFIGS["tiny-vit-336"]),
        VLMConfig(
            "mobilevlm-v2-tiny-336", LLM_CONFIGS["tiny-llama"], VISION_CONFIGS["tiny-vit-336"], "ldpnetv2"
        ),
        VLMConfig("mobilevlm-tiny-256-336", LLM_CONFIGS["tiny-llama-256"], VISION_CONFIGS["tiny-vit-336"]),
    ]
}

AnyConfig = LLMConfig | VisionConfig | VLMConfig


def config_names() -> dict[str, str]:
    """Every row name with its kind (``llm``, ``vision``, ``vlm``)."""
    names = {n: "llm" for n in LLM_CONFIGS}
    names |= {n: "vision" for n in VISION_CONFIGS}
    names |= {n: "vlm" for n in VLM_CONFIGS}
    return names


def get_config(name: str, **overrides: Any) -> AnyConfig:
    """The row ``name`` with ``overrides`` applied.

    For a VLM row, a key naming a VLM field sets it, a key ``vision_<field>`` sets the vision
    row's field, and any other key sets the language model row's field.
    """
    for table in (LLM_CONFIGS, VISION_CONFIGS, VLM_CONFIGS):
        if name in table:
            config = _apply_overrides(table[name], overrides)
            config.validate()
            return config
    known = ", ".join(sorted(config_names()))
    raise KeyError(f"unknown model config {name!r}; known configs: {known}")


def _apply_overrides(config: AnyConfig, overrides: dict[str, Any]) -> AnyConfig:
    if not overrides:
        return config
    if not isinstance(config, VLMConfig):
        return _replace(config, overrides)
    own = {k: v for k, v in overrides.items() if k in _fields(VLMConfig)}
    vision = {k.removeprefix("vision_"): v for k, v in overrides.items() if k.startswith("vision_")}
    llm = {k: v for k, v in overrides.items() if k not in own and not k.startswith("vision_")}
    return dataclasses.replace(
        config, llm=_replace(config.llm, llm), vision=_replace(config.vision, vision), **own
    )


def _replace(config: LLMConfig | VisionConfig, overrides: dict[str, Any]) -> Any:
    unknown = sorted(set(overrides) - _fields(type(config)))
    if unknown:
        raise TypeError(
            f"unknown override(s) {unknown} for {config.name}; allowed: {sorted(_fields(type(config)))}"
        )
    return dataclasses.replace(config, **overrides) if overrides else config


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def vision_by_hub_id(hub_id: str) -> VisionConfig | None:
    """The vision row whose released weights live at ``hub_id`` (as in ``mm_vision_tower``)."""
    return next((c for c in VISION_CONFIGS.values() if hub_id in (c.hub_id, c.name)), None)
