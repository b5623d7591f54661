"""Caption and image checks, sample keys and splits, and the one image normalisation of every route.

``normalise_image`` is what every image goes through, whichever route brought it (URL lists through
img2dataset, which only downloads; LLaVA json with local files; instruct data; evaluation images):
the header is read and the original size checked (``image_too_large``, ``image_too_small``,
``bad_aspect_ratio``) before any pixel is decoded or resized; then the first frame is decoded, EXIF
orientation applied, the mode converted by ``model.image.to_rgb`` (16-bit scaled to 8 bits,
transparency composited onto white), resized by the spec's ``resize_mode`` and encoded as JPEG
quality 95. The same file gives the same stored bytes on every route. Reject details are our own
sentences; the decoder's text goes to the log.
"""

from __future__ import annotations

import hashlib
import io
import logging
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.data.shards import SAFE_KEY
from tasks.data.specs import Filters

log = logging.getLogger(__name__)

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


JPEG_MAX_SIDE = 65500
"""Largest width or height a JPEG can hold."""


def resized_size(width: int, height: int, size: int, mode: str) -> tuple[int, int]:
    """(width, height) after ``resize_image`` scales, before center_crop's crop or border's padding.
    Images are only ever made smaller (a small one is stored as it is: no invented pixels)."""
    if mode == "no":
        return width, height
    scale = size / (min(width, height) if mode in ("keep_ratio", "center_crop") else max(width, height))
    if scale >= 1:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))


def resize_image(image: Any, size: int, mode: str) -> Any:
    """Resize like img2dataset with ``resize_only_if_bigger``: keep_ratio brings the SMALLER side down
    to ``size`` (center_crop then crops the centre square), border the larger side and pads to a white
    ``size`` square, no keeps the size. Downscaling uses Pillow's BOX filter (area averaging)."""
    from PIL import Image

    if mode == "no":
        return image
    width, height = image.size
    new = resized_size(width, height, size, mode)
    if new != (width, height):
        image = image.resize(new, Image.Resampling.BOX)
    if mode == "center_crop":
        side = min(size, *new)
        left, top = (new[0] - side) // 2, (new[1] - side) // 2
        image = image.crop((left, top, left + side, top + side))
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


def jpeg_side_problem(
    size: tuple[int, int], original: tuple[int, int], image_size: int, resize_mode: str
) -> tuple[str, str] | None:
    """(reason, detail) when an image of ``size`` would, once resized, have a side a JPEG cannot hold."""
    target = resized_size(*size, image_size, resize_mode)
    if max(target) <= JPEG_MAX_SIDE:
        return None
    return (
        "bad_aspect_ratio",
        f"{original[0]}x{original[1]} would be {target[0]}x{target[1]} after {resize_mode} to "
        f"{image_size}; a JPEG side holds at most {JPEG_MAX_SIDE} pixels (lower max_aspect_ratio)",
    )


class ImageRejected(ValueError):
    """An image that fails a check or does not decode: ``reason`` and our own ``detail``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class NormalisedImage:
    """An image as stored in shards."""

    jpeg: bytes
    """JPEG quality 95 bytes of the RGB, oriented, resized image."""
    width: int
    """Stored width."""
    height: int
    """Stored height."""
    original_width: int
    """Width of the file's image (before orientation and resizing)."""
    original_height: int
    """Height of the file's image."""

    def meta(self) -> dict[str, int]:
        """The sizes as sample metadata."""
        return {
            "width": self.width,
            "height": self.height,
            "original_width": self.original_width,
            "original_height": self.original_height,
        }


def normalise_image(
    source: bytes | str | Path, filters: Filters, image_size: int, resize_mode: str, name: str = "image"
) -> NormalisedImage:
    """The stored form of one image file or its bytes; ``ImageRejected`` when it must be set aside."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    from model.image import to_rgb

    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    # Sizes are checked from the header before any decode, so Pillow's own (process-wide) bomb
    # limit is off for this open only; Ray workers run one task at a time.
    pillow_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(stream) as image:
            original = image.size
            if bad := image_problem(*original, filters):
                raise ImageRejected(*bad)
            image.load()
            rgb = to_rgb(ImageOps.exif_transpose(image) or image)
    except ImageRejected:
        raise
    except UnidentifiedImageError as err:
        log.debug("%s: %s", name, err)
        raise ImageRejected(
            "decode_error", "not an image in a format we read (JPEG, PNG, GIF, WebP, ...)"
        ) from None
    except Exception as err:  # any decoder failure is a reject; its text goes to the log only
        log.debug("%s: %s: %s", name, type(err).__name__, err)
        raise ImageRejected(
            "decode_error", "the image data is truncated or corrupt and does not decode"
        ) from None
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit
    if bad := jpeg_side_problem(rgb.size, original, image_size, resize_mode):
        raise ImageRejected(*bad)
    out = resize_image(rgb, image_size, resize_mode)
    return NormalisedImage(encode_jpeg(out), out.size[0], out.size[1], original[0], original[1])
