"""Reading evaluation files with the same guards as training sources: bounded lines, bounded whole
JSON, images checked from their header, paths that stay inside their folder. Problems with one
question are rejects (counted by reason, kept aside); problems with a whole file are errors that
name the file and say what to do."""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tasks.data.bounded_read import bounded_lines, line_limit, load_whole_json
from tasks.data.builder import BuildError
from tasks.data.image_checks import ImageRejected, image_problem
from tasks.data.rejects import Rejects
from tasks.data.specs import Filters

log = logging.getLogger(__name__)

FILTERS = Filters(max_chars=200_000)
"""Size limits for evaluation files: lines up to ~3.4 MB (MMBench rows carry base64 images)."""


class EvalSetError(ValueError):
    """An evaluation set that cannot be read or scored as it is."""


def read_json(path: Path, what: str, expect: type[dict] | type[list] = dict) -> Any:
    """A whole JSON file holding an ``expect`` (object or list); EvalSetError names the file when it
    is missing, too big, malformed or of the other shape."""
    try:
        data = load_whole_json(str(path), FILTERS, what)
    except BuildError as err:
        raise EvalSetError(str(err)) from None
    if not isinstance(data, expect):
        shape = "an object" if expect is dict else "a list"
        raise EvalSetError(
            f"{path}: the {what} file must hold {shape} at the top, it holds a {type(data).__name__}: "
            "is this the benchmark's file? (see the spec's files)"
        )
    return data


def read_jsonl(path: Path, rejects: Rejects, subset: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each line; malformed or oversized lines become rejects."""
    limit = line_limit(FILTERS, FILTERS.max_chars)
    try:
        handle = open(path, "rb")  # noqa: SIM115 (closed below, after the generator is drained)
    except OSError as err:
        raise EvalSetError(
            f"{path}: cannot read the question file ({err.strerror}); check the spec's files"
        ) from None
    with handle:
        for line in bounded_lines(handle, limit):
            if line.data is None:
                rejects.add(
                    "oversized_line",
                    subset,
                    str(path),
                    line.number,
                    f"{line.size} bytes > {limit}",
                    line.head,
                )
                continue
            if not line.data.strip():
                continue
            try:
                row = json.loads(line.data.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError):
                rejects.add("invalid_json", subset, str(path), line.number, "not one JSON object", line.head)
                continue
            if not isinstance(row, dict):
                rejects.add("invalid_json", subset, str(path), line.number, "not a JSON object", line.head)
                continue
            yield line.number, row


def missing_fields(row: dict[str, Any], fields: tuple[str, ...]) -> list[str]:
    """The fields of ``fields`` that ``row`` lacks or has empty."""
    return [f for f in fields if row.get(f) in (None, "")]


def inside(root: Path, relative: str) -> Path | None:
    """``root / relative`` when it stays inside ``root`` (no absolute path, no ``..`` out), else None."""
    if not isinstance(relative, str) or not relative or Path(relative).is_absolute():
        return None
    path = (root / relative).resolve()
    return path if path.is_relative_to(root.resolve()) else None


def image_reject(ref: str) -> tuple[str, str] | None:
    """(reason, detail) when the image at ``ref`` (a path or ``base64:`` data) is missing, not an
    image or too large, read from its header only; None when it looks fine."""
    from PIL import Image, UnidentifiedImageError

    try:
        source = io.BytesIO(_b64(ref)) if ref.startswith("base64:") else open(ref, "rb")  # noqa: SIM115
    except FileNotFoundError:
        return "missing_image", f"{ref} does not exist: fetch the benchmark's images (see the spec's files)"
    except (OSError, binascii.Error, ValueError) as err:
        log.debug("%s: %s", ref[:80], err)
        return "decode_error", "the image cannot be read (bad base64 or unreadable file)"
    pillow_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with source, Image.open(source) as image:
            return image_problem(*image.size, FILTERS)
    except (UnidentifiedImageError, OSError) as err:
        log.debug("%s: %s", ref[:80], err)
        return "decode_error", "not an image in a format we read (JPEG, PNG, GIF, WebP, ...)"
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit


def load_image(ref: str) -> Any:
    """The RGB image at ``ref``; ImageRejected (reason, our detail) when it does not decode."""
    from PIL import Image

    from model.image import to_rgb

    if bad := image_reject(ref):
        raise ImageRejected(*bad)
    try:
        source = io.BytesIO(_b64(ref)) if ref.startswith("base64:") else ref
        with Image.open(source) as image:
            image.load()
            return to_rgb(image)
    except Exception as err:  # any decoder failure: our message, the library's text in the log
        log.debug("%s: %s: %s", ref[:80], type(err).__name__, err)
        raise ImageRejected("decode_error", "the image data is truncated or corrupt") from None


def _b64(ref: str) -> bytes:
    return base64.b64decode(ref.removeprefix("base64:"), validate=True)
