"""Caption and image checks, sample keys and splits, and the img2dataset-style resize / JPEG encode."""

from __future__ import annotations

import hashlib
import io
import unicodedata
from typing import Any

from tasks.shards import SAFE_KEY
from tasks.specs import Filters

JPEG_QUALITY = 95


_CONTROL = {c: None for c in (*range(32), 0x7F) if not chr(c).isspace()}


def normalise_caption(text: Any) -> str:
    """NFC, no control characters (NUL, ESC, ...), single spaces (every run of whitespace, newlines
    included, becomes one space)."""
    if not isinstance(text, str):
        return ""
    return " ".join(unicodedata.normalize("NFC", text).translate(_CONTROL).split())


def caption_problem(caption: str, filters: Filters) -> tuple[str, str] | None:
    """(reason, detail) when a normalised caption fails the filters, else None."""
    if not caption:
        return "empty_caption", "caption is empty after normalisation"
    words = len(caption.split(" "))
    if words < filters.min_caption_words:
        return "caption_too_short", f"{words} words < min_caption_words {filters.min_caption_words}"
    if len(caption) < filters.min_chars:
        return "caption_too_short", f"{len(caption)} chars < min_chars {filters.min_chars}"
    if len(caption) > filters.max_caption_chars:
        return "caption_too_long", f"{len(caption)} chars > max_caption_chars {filters.max_caption_chars}"
    return None


def image_problem(width: int, height: int, filters: Filters) -> tuple[str, str] | None:
    """(reason, detail) when an (original) image size fails the filters, else None."""
    if width * height > filters.max_image_pixels:
        return "image_too_large", f"{width}x{height} > max_image_pixels {filters.max_image_pixels}"
    if min(width, height) < filters.min_image_side:
        return "image_too_small", f"{width}x{height}: a side < min_image_side {filters.min_image_side}"
    ratio = max(width, height) / max(min(width, height), 1)
    if ratio > filters.max_aspect_ratio:
        return "bad_aspect_ratio", f"{width}x{height}: aspect {ratio:.1f} > {filters.max_aspect_ratio}"
    return None


def subset_slug(subset: str) -> str:
    """A subset name usable inside sample keys (``.`` is not allowed there)."""
    return subset.replace(".", "-")


def sample_key(subset: str, ident: str) -> str:
    """``{subset}-{ident}``; idents that are not key-safe (or too long) become a hash of themselves."""
    if not ident or not set(ident) <= SAFE_KEY or len(ident) > 120:
        ident = "h" + hashlib.sha256(ident.encode("utf-8", "surrogatepass")).hexdigest()[:24]
    return f"{subset_slug(subset)}-{ident}"


def split_for(key: str, fraction: float) -> str:
    """``heldout`` for a stable ``fraction`` of keys (sha256 of the key), else ``train``."""
    if fraction <= 0:
        return "train"
    value = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "heldout" if value < fraction else "train"


def to_rgb(image: Any) -> Any:
    """RGB image; transparency is composited onto white (as img2dataset does); 16-bit greyscale is
    scaled to 8 bits (Pillow's ``convert`` would clip it to white)."""
    from PIL import Image

    if image.mode.startswith("I;16") or image.mode == "I":
        import numpy as np

        grey = np.clip(np.asarray(image, dtype=np.int64), 0, 0xFFFF) >> 8
        return Image.fromarray(grey.astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def resize_image(image: Any, size: int, mode: str) -> Any:
    """Resize like img2dataset: keep_ratio puts the SMALLER side at ``size`` (center_crop then crops the
    centre square), border puts the larger side at ``size`` and pads with white, no keeps the size."""
    from PIL import Image

    if mode == "no":
        return image
    width, height = image.size
    scale = size / (min(width, height) if mode in ("keep_ratio", "center_crop") else max(width, height))
    new = (max(1, round(width * scale)), max(1, round(height * scale)))
    if new != (width, height):
        resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.LANCZOS
        image = image.resize(new, resample)
    if mode == "center_crop":
        left, top = (new[0] - size) // 2, (new[1] - size) // 2
        image = image.crop((left, top, left + size, top + size))
    elif mode == "border":
        canvas = Image.new("RGB", (size, size), (255, 255, 255))
        canvas.paste(image, ((size - new[0]) // 2, (size - new[1]) // 2))
        image = canvas
    return image


def encode_jpeg(image: Any) -> bytes:
    """JPEG quality 95, no metadata: the same pixels always give the same bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def decoded_size(data: bytes) -> tuple[int, int]:
    """(width, height) of image bytes, fully decoded (raises on corrupt data)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.size
