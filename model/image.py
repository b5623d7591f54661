"""CLIP image preprocessing without torchvision (PIL + numpy + torch).

Reproduces ``transformers.CLIPImageProcessor`` (shortest-edge BICUBIC resize, centre crop, rescale,
normalise) and LLaVA's ``image_aspect_ratio="pad"`` mode (``expand2square`` with the mean colour).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
PreprocessMode = Literal["pad", "resize_crop"]
PREPROCESS_MODES: tuple[str, ...] = ("pad", "resize_crop")
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 70, 220), "yellow": (240, 210, 40)}
"""Colours of the generated test images (``square_image``)."""


def mean_background(mean: Sequence[float] = CLIP_MEAN) -> tuple[int, int, int]:
    """The padding colour LLaVA uses: ``tuple(int(m * 255) for m in mean)``."""
    if len(mean) != 3:
        raise ValueError(f"mean must have 3 values (R, G, B), got {len(mean)}: {mean!r}")
    r, g, b = (int(m * 255) for m in mean)
    return r, g, b


WHITE = (255, 255, 255)
"""Where images have transparency, they are composited onto this colour (img2dataset's rule)."""


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB pixels of any PIL mode, by the one policy every route uses (training data and inference).

    * 16-bit and 32-bit greyscale (``I;16*``, ``I``): scaled to 8 bits (``value >> 8``, clipped to
      16 bits first); Pillow's own ``convert`` would clip them to white. ``F`` is clipped to 0..255.
    * Transparency (``RGBA``, ``LA``, ``PA``, ``P`` with a transparent index): composited onto white.
    * Everything else (``L``, ``1``, ``P``, ``CMYK``, ``YCbCr``, ...): Pillow's conversion.
    """
    if not isinstance(img, Image.Image):
        raise TypeError(
            f"expected a PIL.Image.Image, got {type(img).__name__}; open files with PIL.Image.open"
        )
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode == "I":
        grey = np.clip(np.asarray(img, dtype=np.int64), 0, 0xFFFF) >> 8
        return Image.fromarray(grey.astype(np.uint8)).convert("RGB")
    if img.mode == "F":
        return Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, WHITE)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")


def expand_to_square(img: Image.Image, background: tuple[int, int, int] | None = None) -> Image.Image:
    """Paste ``img`` centred on a square canvas of its larger side filled with ``background`` (LLaVA "pad").

    ``background`` defaults to the CLIP mean colour. Square images are returned unchanged.
    """
    background = mean_background() if background is None else background
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    canvas = Image.new(img.mode, (side, side), background)
    canvas.paste(img, ((side - width) // 2, (side - height) // 2))
    return canvas


def shortest_edge_size(width: int, height: int, size: int) -> tuple[int, int]:
    """Target (width, height) with the shortest side == ``size``; the long side truncated like HF."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def resize_shortest_edge(img: Image.Image, size: int) -> Image.Image:
    """BICUBIC resize so that the shortest side equals ``size`` (aspect ratio kept)."""
    target = shortest_edge_size(img.width, img.height, size)
    if target == img.size:
        return img
    return img.resize(target, resample=Image.Resampling.BICUBIC)


def center_crop(arr: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop an HWC array to ``size`` x ``size`` (HF rounding: offsets floored)."""
    height, width = arr.shape[:2]
    if height < size or width < size:
        raise ValueError(f"cannot centre-crop a {width}x{height} image to {size}x{size}; resize it first")
    top = (height - size) // 2
    left = (width - size) // 2
    return arr[top : top + size, left : left + size]


@functools.lru_cache(maxsize=8)
def _normalize_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(channels, 256) float32: every uint8 value rescaled by 1/255 (in float64, like HF), then
    ``(x - mean) / std`` in float32, per channel."""
    scaled = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    mean32, std32 = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(((scaled[:, None] - mean32) / std32).T)


def normalize(arr: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 HWC -> float32 CHW: rescale by 1/255 then ``(x - mean) / std``, by table lookup (each
    output depends on one byte and its channel only, so the table gives HF's float32 values exactly)."""
    table = _normalize_table(tuple(map(float, mean)), tuple(map(float, std)))
    return np.stack([table[c][arr[..., c]] for c in range(arr.shape[-1])])


def preprocess_image(
    img: Image.Image,
    size: int,
    mode: PreprocessMode = "pad",
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """Preprocess one PIL image into a float32 ``(3, size, size)`` tensor for a CLIP vision tower.

    ``pad``: expand to a square with the mean colour first (LLaVA / MobileVLM default), then as
    ``resize_crop``: shortest side -> ``size`` (BICUBIC), centre crop, rescale, normalise.
    """
    if mode not in PREPROCESS_MODES:
        raise ValueError(f"unknown image preprocessing mode {mode!r}; expected one of {PREPROCESS_MODES}")
    if size <= 0:
        raise ValueError(f"image size must be positive, got {size}")
    img = to_rgb(img)
    if mode == "pad":
        img = expand_to_square(img, mean_background(mean))
    arr = center_crop(np.asarray(resize_shortest_edge(img, size)), size)
    return torch.from_numpy(normalize(arr, mean, std))


def preprocess_images(
    images: Sequence[Image.Image],
    size: int,
    mode: PreprocessMode = "pad",
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """Preprocess a list of PIL images into a float32 ``(N, 3, size, size)`` batch."""
    if len(images) == 0:
        return torch.empty((0, 3, size, size), dtype=torch.float32)
    return torch.stack([preprocess_image(img, size, mode, mean, std) for img in images])


def square_image(colour: str, size: int = 56) -> Image.Image:
    """A generated test image: a square of ``colour`` (a ``COLOURS`` key) centred on white."""
    image = Image.new("RGB", (size, size), (255, 255, 255))
    ImageDraw.Draw(image).rectangle(
        [size // 4, size // 4, 3 * size // 4, 3 * size // 4], fill=COLOURS[colour]
    )
    return image
