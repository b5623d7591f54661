"""Instruct and chat builds: LLaVA-style conversations (with their images, for ``instruct``) into shards.

Each sample is ``{key}.json`` (``id``, ``conversations``, ``image`` path as given, ``subset``) plus
``{key}.jpg`` when it has an image. Conversations are validated (roles alternate, human first,
``<image>`` exactly once in the first human turn when there is an image, never otherwise); image
paths must resolve inside the spec's image root. Bad records are rejected with a reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tasks.data.bounded_read import load_whole_json
from tasks.data.builder import (
    BuildContext,
    BuildError,
    FanOut,
    Unit,
    UnitResult,
    expand_files,
    finished_unit,
    resolve_path,
    save_unit,
)
from tasks.data.contamination import check_sample
from tasks.data.image_checks import ImageRejected, normalise_image
from tasks.data.rejects import Rejects
from tasks.data.shards import finished_shard, write_shard
from tasks.data.specs import DatasetSpec, Filters

log = logging.getLogger(__name__)
IMAGE = "<image>"
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
"""Control characters a turn may not contain (tab, newline and carriage return are allowed)."""


class SampleError(ValueError):
    """A record that cannot become a sample: ``reason`` is the reject reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def load_records(path: str, filters: Filters | None = None) -> list[Any]:
    """The json list of a LLaVA/ShareGPT-style file (BOM tolerated); a file above
    ``filters.max_json_bytes`` is refused before it is read."""
    data = load_whole_json(path, filters or Filters(), "JSON")
    if not isinstance(data, list):
        raise BuildError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def check_conversation(record: dict[str, Any], has_image: bool, max_chars: int) -> list[dict[str, str]]:
    """Validated turns of a record; SampleError names what is wrong."""
    from model.conversation import validate_conversation

    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise SampleError("bad_conversation", "missing or empty 'conversations' list")
    try:
        validate_conversation(turns)
    except ValueError as err:
        raise SampleError("bad_conversation", str(err)) from None
    for i, turn in enumerate(turns):
        if len(turn["value"]) > max_chars:
            raise SampleError("too_long", f"turn {i} has {len(turn['value'])} chars > {max_chars}")
        if bad := _CONTROL.search(turn["value"]):
            raise SampleError(
                "control_characters", f"turn {i} contains U+{ord(bad.group()):04X} at offset {bad.start()}"
            )
    placements = [i for i, t in enumerate(turns) for _ in range(t["value"].count(IMAGE))]
    if has_image and placements != [0]:
        raise SampleError(
            "image_placeholder", f"an image sample needs exactly one {IMAGE} in turn 0, found {placements}"
        )
    if not has_image and placements:
        raise SampleError("image_placeholder", f"{IMAGE} in a sample without an image (turns {placements})")
    return [{"from": t["from"], "value": t["value"]} for t in turns]


def resolve_image(root: str, name: Any) -> Path:
    """The image file for ``name`` inside ``root``; SampleError for escapes and missing files."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise SampleError(
            "bad_image_field", f"image field must be a non-empty string without NUL, got {name!r}"
        )
    if os.path.isabs(name) or ".." in Path(name).parts or "\\" in name:
        raise SampleError("path_outside_root", f"image path {name!r} is absolute or has '..'")
    root_real = Path(root).resolve()
    try:
        path = (root_real / name).resolve()
        outside, is_file = not path.is_relative_to(root_real), path.is_file()
    except (OSError, RuntimeError, ValueError) as err:  # name too long, symlink loop, unencodable
        raise SampleError("missing_image", f"cannot resolve image path {name[:200]!r}: {err}"[:300]) from None
    if outside:
        raise SampleError("path_outside_root", f"image path {name!r} resolves outside the image root")
    if not is_file:
        raise SampleError("missing_image", f"image {name!r} not found under {root}")
    return path


def load_image_bytes(path: Path, spec: DatasetSpec) -> bytes:
    """The stored JPEG of an image: the one normalisation of every route (``normalise_image``)."""
    try:
        return normalise_image(
            path, spec.filters, int(spec.image_size or 0), spec.resize_mode, str(path)
        ).jpeg
    except ImageRejected as err:
        raise SampleError(err.reason, err.detail) from None


def stable_fraction(text: str) -> float:
    """A number in [0, 1) from a stable hash (held-out assignment)."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 0x100000000


def make_sample(
    record: Any, spec: DatasetSpec, image_root: str | None, key: str, subset: str
) -> dict[str, Any]:
    """A webdataset sample from one record; SampleError when it must be rejected."""
    if not isinstance(record, dict):
        raise SampleError("invalid_record", f"expected an object, got {type(record).__name__}")
    has_image = record.get("image") is not None
    if has_image and spec.kind == "chat":
        raise SampleError("unexpected_image", "chat samples are text-only")
    if has_image and image_root is None:
        raise SampleError("missing_image", "record has an image but the spec has no image_root")
    turns = check_conversation(record, has_image, spec.filters.max_chars)
    meta = {
        "id": str(record.get("id", key)),
        "conversations": turns,
        "image": record.get("image"),
        "subset": subset,
    }
    try:
        sample = {"__key__": key, "json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode()}
    except UnicodeEncodeError as err:  # JSON allows lone surrogates (\ud800); UTF-8 does not
        raise SampleError("invalid_unicode", f"lone surrogate in the record: {err}") from None
    if has_image:
        sample["jpg"] = load_image_bytes(resolve_image(image_root, record["image"]), spec)
    return sample


def plan_units(ctx: BuildContext) -> list[tuple[Unit, int, list[Any], set[int]]]:
    """Jobs of ``shard_samples`` records each: (unit, first index, records, indices of duplicate ids).

    Each file is parsed once here; a record whose ``id`` appeared earlier in its subset is a
    duplicate (the first occurrence wins).
    """
    jobs: list[tuple[Unit, int, list[Any], set[int]]] = []
    for sub in ctx.spec.subsets:
        path = expand_files(ctx.data_root, [sub.source.path])[0]
        records = load_records(path, ctx.spec.filters)
        duplicates = _duplicate_indices(records)
        for start in range(0, max(len(records), 1), ctx.spec.shard_samples):
            end = start + ctx.spec.shard_samples
            unit = Unit(len(jobs), sub.name, path)
            jobs.append((unit, start, records[start:end], {i for i in duplicates if start <= i < end}))
    return jobs


def _duplicate_indices(records: list[Any]) -> set[int]:
    seen: set[str] = set()
    out: set[int] = set()
    for i, record in enumerate(records):
        ident = record.get("id") if isinstance(record, dict) else None
        if ident is None:
            continue
        if str(ident) in seen:
            out.add(i)
        seen.add(str(ident))
    return out


def build_unit(job: tuple[Unit, int, list[Any], set[int]], ctx: BuildContext) -> UnitResult:
    """Validate and write one slice of records as train/held-out shards."""
    unit, start, records, dups = job
    if (done := finished_unit(ctx, unit.index)) is not None:
        return done
    src = next(s.source for s in ctx.spec.subsets if s.name == unit.subset)
    root = resolve_path(ctx.data_root, src.image_root) if src.image_root else None
    rejects, splits = Rejects(), {"train": [], "heldout": []}
    for offset, record in enumerate(records):
        index = start + offset
        key = f"{unit.subset.replace('.', '-')}-{index:08d}"
        try:
            if index in dups:
                raise SampleError("duplicate_id", f"id {record.get('id')!r} appeared earlier in the file")
            sample = make_sample(record, ctx.spec, root, key, unit.subset)
            if bad := _contamination(ctx, record, root):
                raise SampleError(*bad)
        except SampleError as err:
            excerpt = json.dumps(record, ensure_ascii=False)[:300]
            rejects.add(err.reason, unit.subset, unit.source, f"record {index}", str(err), excerpt)
            continue
        meta = json.loads(sample["json"])
        # By image where there is one: every conversation about an image lands in the same split.
        held_out = stable_fraction(str(meta["image"] or meta["id"])) < ctx.spec.heldout_fraction
        splits["heldout" if held_out else "train"].append(sample)
    shards = []
    for split, samples in splits.items():
        if samples:
            rel = f"shards/{split}/{unit.subset}-{unit.index:05d}.tar"
            record = finished_shard(ctx.out, rel) or write_shard(ctx.out, rel, samples, split, unit.subset)
            shards.append(asdict(record))
    images = sum("jpg" in s for v in splits.values() for s in v)
    counts = {"read": len(records), "rejected": len(rejects.items), "kept": len(records) - len(rejects.items)}
    counts |= {"images": images, "text_only": counts["kept"] - images}
    return save_unit(ctx, UnitResult(unit.index, unit.subset, shards, counts, rejects.to_rows()))


def _contamination(ctx: BuildContext, record: dict[str, Any], root: str | None) -> tuple[str, str] | None:
    """Whether a valid record shows an eval image or asks an eval question (``decontaminate``)."""
    if ctx.eval_index is None:
        return None
    image = resolve_image(root, record["image"]) if root and record.get("image") is not None else None
    return check_sample(ctx, image, [turn["value"] for turn in record["conversations"]])


def build_conversations(ctx: BuildContext, fan_out: FanOut) -> list[UnitResult]:
    """All units of an instruct or chat spec."""
    return fan_out(build_unit, plan_units(ctx), ctx, label=f"{ctx.spec.name}: conversations")
