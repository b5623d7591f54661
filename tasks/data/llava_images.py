"""``llava_json`` subsets (LLaVA-Pretrain-558K) of image-text builds.

No download; images are read under ``image_root`` (absolute paths, ``..`` and symlinks leaving the
root are refused), resized with PIL the way img2dataset's ``resize_mode`` does it and re-encoded as
JPEG quality 95. Units: ``shard_samples`` entries each.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.core.identity import sha256_file
from tasks.data.bounded_read import load_whole_json
from tasks.data.builder import (
    BuildContext,
    BuildError,
    Unit,
    UnitResult,
    expand_files,
    resolve_path,
)
from tasks.data.dedup import (
    UnitKeys,
    scan_record,
)
from tasks.data.image_checks import (
    ImageRejected,
    caption_problem,
    normalise_caption,
    normalise_image,
    sample_key,
)
from tasks.data.image_units import (
    UnitWriter,
    contamination,
    image_dedup_plan,
    keepable_phash,
    scan_results,
)
from tasks.data.specs import Filters, LlavaSource, Subset

log = logging.getLogger(__name__)


# --- llava json ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LlavaJob:
    """Second pass over one chunk of a LLaVA json."""

    unit: Unit
    """The unit."""
    image_root: str
    """Folder the ``image`` fields are relative to."""
    entries: list[dict[str, Any]]
    """Prepared entries (``prepare_llava``), in json order."""


def _gpt_caption(conversations: Any) -> str | None:
    """The first assistant (``gpt``) turn's text."""
    if not isinstance(conversations, list):
        return None
    for turn in conversations:
        if isinstance(turn, dict) and turn.get("from") in ("gpt", "assistant"):
            value = turn.get("value")
            return value if isinstance(value, str) else None
    return None


def prepare_llava(path: str, subset: str, filters: Filters | None = None) -> list[dict[str, Any]]:
    """Entries of a LLaVA pretrain json as ``{where, key, image, caption}`` or ``{where, reason, detail}``;
    duplicate keys after the first are rejects. A file above ``filters.max_json_bytes`` is refused."""
    data = load_whole_json(path, filters or Filters(), "LLaVA json")
    if not isinstance(data, list):
        raise BuildError(f"{path}: expected a json list of entries, got {type(data).__name__}")
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, entry in enumerate(data):
        where = f"entry {i}"
        if not isinstance(entry, dict) or "id" not in entry:
            out.append(
                {
                    "where": where,
                    "reason": "invalid_entry",
                    "detail": "not an object with an id",
                    "excerpt": str(entry)[:200],
                }
            )
            continue
        try:
            json.dumps(entry, ensure_ascii=False).encode()
        except UnicodeEncodeError as err:  # JSON allows lone surrogates (\ud800); UTF-8 does not
            out.append(
                {"where": where, "reason": "invalid_unicode", "detail": f"lone surrogate in the entry: {err}"}
            )
            continue
        image = entry.get("image")
        caption = _gpt_caption(entry.get("conversations"))
        if not isinstance(image, str):
            out.append(
                {
                    "where": where,
                    "reason": "invalid_entry",
                    "detail": "no image field",
                    "excerpt": str(entry)[:200],
                }
            )
        elif caption is None:
            out.append(
                {
                    "where": where,
                    "reason": "missing_caption",
                    "detail": "no gpt turn with text",
                    "excerpt": str(entry)[:200],
                }
            )
        else:
            key = sample_key(subset, str(entry["id"]))
            if key in seen:
                out.append(
                    {"where": where, "reason": "duplicate", "detail": f"id {entry['id']!r} seen before"}
                )
                continue
            seen.add(key)
            out.append(
                {"where": where, "key": key, "id": str(entry["id"]), "image": image, "caption": caption}
            )
    return out


def image_under_root(root: Path, relative: str) -> tuple[Path | None, str, str]:
    """(resolved path, "", "") for a file under ``root`` (already resolved), else (None, reason, detail)
    with reason ``path_outside_root`` (absolute, ``..``, symlink leaving the root) or ``missing_image``."""
    if not relative or "\x00" in relative:
        return None, "path_outside_root", "empty or invalid image path"
    if relative.startswith(("/", "\\")) or os.path.isabs(relative) or re.match(r"^[A-Za-z]:", relative):
        return None, "path_outside_root", f"absolute image path {relative!r} refused"
    if ".." in re.split(r"[\\/]", relative):
        return None, "path_outside_root", f"image path {relative!r} contains '..'"
    try:
        resolved = (root / relative).resolve()
        outside, is_file = not resolved.is_relative_to(root), resolved.is_file()
    except (OSError, RuntimeError, ValueError) as err:  # name too long, symlink loop, unencodable
        return None, "missing_image", f"cannot resolve {relative[:200]!r}: {err}"[:300]
    if outside:
        return None, "path_outside_root", f"{relative!r} resolves outside the image root (symlink)"
    if not is_file:
        return None, "missing_image", f"{relative!r} not found under the image root"
    return resolved, "", ""


def load_local_image(path: Path, ctx: BuildContext) -> tuple[bytes | None, dict[str, Any], tuple[str, str]]:
    """(jpeg bytes, size meta, ("", "")) for a good image, else (None, {}, (reason, detail))."""
    try:
        image = normalise_image(
            path, ctx.spec.filters, int(ctx.spec.image_size or 0), ctx.spec.resize_mode, str(path)
        )
    except ImageRejected as err:
        return None, {}, (err.reason, err.detail)
    return image.jpeg, image.meta(), ("", "")


def process_llava(job: LlavaJob, ctx: BuildContext) -> UnitResult:
    """Read, check, resize and shard one chunk of LLaVA entries."""
    root = Path(job.image_root).resolve()
    writer = UnitWriter(ctx, job.unit)
    source = job.unit.source.split("#", 1)[0]
    entries = sorted(job.entries, key=lambda e: e.get("key", ""))
    drops, hashed = scan_results(ctx, job.unit.index)

    def samples() -> Iterator[dict[str, Any]]:
        for entry in entries:
            where = entry["where"]
            if "reason" in entry:
                writer.reject(entry["reason"], source, where, entry["detail"], entry.get("excerpt", ""))
                continue
            caption = normalise_caption(entry["caption"])
            if bad := caption_problem(caption, ctx.spec.filters):
                writer.reject(bad[0], source, where, bad[1], entry["caption"])
                continue
            path, reason, detail = image_under_root(root, entry["image"])
            if path is None:
                writer.reject(reason, source, where, detail, entry["image"])
                continue
            jpg, sizes, bad = load_local_image(path, ctx)  # header sizes first, then the decode
            if jpg is None:
                writer.reject(bad[0], source, where, bad[1], entry["image"])
                continue
            if bad := contamination(ctx, hashed, entry["key"], path, caption):
                writer.reject(bad[0], source, where, bad[1], entry["image"])
                continue
            if (drop := drops.get(entry["key"])) is not None:
                writer.reject(
                    drop.reason, source, where, f"near-identical image of {drop.kept}", entry["image"]
                )
                continue
            digest = sha256_file(path)
            meta = {
                "id": entry["id"],
                "image": entry["image"],
                "subset": job.unit.subset,
                "status": "success",
                "sha256": digest,
                **sizes,
            }
            yield writer.keep(entry["key"], jpg, caption, meta)

    return writer.finish(samples())


def scan_llava(job: LlavaJob, ctx: BuildContext) -> dict[str, Any]:
    """Perceptual hashes of one chunk's usable images (``dedup.image``), keyed by sample key."""
    plan = image_dedup_plan(ctx)
    assert plan is not None
    if (done := scan_record(plan, job.unit.index)) is not None:
        return done
    root = Path(job.image_root).resolve()
    keys = UnitKeys(plan)
    for entry in sorted(job.entries, key=lambda e: e.get("key", "")):
        caption = normalise_caption(entry.get("caption"))
        usable = "reason" not in entry and not caption_problem(caption, ctx.spec.filters)
        path = image_under_root(root, entry["image"])[0] if usable else None
        phash = keepable_phash(path, ctx, caption) if path is not None else None
        if phash is not None:
            keys.add(hashlib.sha256(entry["key"].encode()).hexdigest(), entry["key"], phash)
    return keys.save(job.unit.index, job.unit.subset, job.unit.source, {"read": len(job.entries)})


def plan_llava_subset(ctx: BuildContext, sub: Subset, first_index: int) -> list[LlavaJob]:
    """One job per ``shard_samples`` entries of a LLaVA json."""
    src = sub.source
    assert isinstance(src, LlavaSource)
    if not src.image_root:
        raise BuildError(f"spec {ctx.spec.name}: subset {sub.name} needs image_root for image-text builds")
    path = expand_files(ctx.data_root, [src.path])[0]
    root = resolve_path(ctx.data_root, src.image_root)
    if not os.path.isdir(root):
        raise BuildError(f"spec {ctx.spec.name}: image_root {root} is not a folder")
    entries = prepare_llava(path, sub.name, ctx.spec.filters)
    size = ctx.spec.shard_samples
    return [
        LlavaJob(
            Unit(first_index + k, sub.name, f"{path}#chunk{k}"), root, entries[k * size : (k + 1) * size]
        )
        for k in range(math.ceil(len(entries) / size))
    ]
