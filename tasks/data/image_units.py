"""What every image-text unit shares: the split-aware writer, the near-identical image search
(``dedup.image``) and the build's ``preview.png``.

The second pass (Ray, one task per unit) filters captions and images, assigns the held-out split by
a stable hash of the sample key and writes the final shards ``shards/{train,heldout}/*.tar`` in
img2dataset's per-sample layout: ``{key}.jpg``, ``{key}.txt``, ``{key}.json`` (json without timings
or ports, so a resumed build is byte-identical).
"""

from __future__ import annotations

import io
import json
import logging
import math
import textwrap
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from tasks.core.identity import atomic_write_bytes
from tasks.data.builder import (
    BuildContext,
    Unit,
    UnitResult,
    save_unit,
)
from tasks.data.contamination import check_sample, check_signature
from tasks.data.dedup import (
    DedupPlan,
    Drop,
    NearRule,
    scan_wheres,
    unit_drops,
)
from tasks.data.image_checks import (
    image_problem,
    jpeg_side_problem,
    split_for,
)
from tasks.data.rejects import Rejects
from tasks.data.shard_read import read_tar_samples
from tasks.data.shards import write_shard
from tasks.data.signatures import image_phash

log = logging.getLogger(__name__)

PREVIEW_SAMPLES = 16
PREVIEW_CELL = 160


# --- writing a unit ------------------------------------------------------------------------------


@dataclass
class UnitWriter:
    """Counts, rejects and the split-aware shard writing of one unit."""

    ctx: BuildContext
    unit: Unit
    rejects: Rejects = field(default_factory=Rejects)
    counts: dict[str, int] = field(
        default_factory=lambda: {"read": 0, "kept": 0, "rejected": 0, "images": 0, "bytes": 0}
    )
    heldout: list[dict[str, Any]] = field(default_factory=list)

    def reject(self, reason: str, source: str, where: str, detail: str = "", excerpt: Any = "") -> None:
        """Count a sample as read and rejected."""
        self.counts["read"] += 1
        self.counts["rejected"] += 1
        self.rejects.add(reason, self.unit.subset, source, where, detail, excerpt)

    def keep(self, key: str, jpg: bytes, caption: str, meta: dict[str, Any]) -> dict[str, Any]:
        """Count a sample as read and kept; return it in the webdataset layout."""
        self.counts["read"] += 1
        self.counts["kept"] += 1
        self.counts["images"] += 1
        self.counts["bytes"] += len(jpg)
        text = json.dumps(
            {**meta, "key": key, "caption": caption}, sort_keys=True, ensure_ascii=False, indent=2
        )
        return {"__key__": key, "jpg": jpg, "txt": caption.encode(), "json": text.encode()}

    def shard_path(self, split: str) -> str:
        """Where this unit's shard of ``split`` goes (relative to the build folder)."""
        return f"shards/{split}/{self.unit.subset}-{self.unit.index:05d}-00000.tar"

    def finish(self, samples: Iterator[dict[str, Any]]) -> UnitResult:
        """Write the kept ``samples`` (key order) to a train and a held-out shard; save the unit record."""
        fraction = self.ctx.spec.heldout_fraction

        def train() -> Iterator[dict[str, Any]]:
            for sample in samples:
                if split_for(sample["__key__"], fraction) == "heldout":
                    self.heldout.append(sample)
                else:
                    yield sample

        records = []
        stream = train()
        first = next(stream, None)
        if first is not None:
            records.append(
                write_shard(
                    self.ctx.out, self.shard_path("train"), chain([first], stream), "train", self.unit.subset
                )
            )
        if self.heldout:
            records.append(
                write_shard(
                    self.ctx.out, self.shard_path("heldout"), self.heldout, "heldout", self.unit.subset
                )
            )
        if self.counts["read"] != self.counts["kept"] + self.counts["rejected"]:
            raise AssertionError(f"unit {self.unit.index}: counts do not add up: {self.counts}")
        result = UnitResult(
            self.unit.index,
            self.unit.subset,
            [asdict(r) for r in records],
            dict(self.counts),
            self.rejects.to_rows(),
        )
        return save_unit(self.ctx, result)


# --- near-identical images ----------------------------------------------------------------------


def keepable_phash(source: bytes | str | Path, ctx: BuildContext, caption: str) -> np.ndarray | None:
    """The perceptual hash of an image the write pass will keep, else None: an image it rejects (sizes
    from the header, aspect ratio, decode, eval contamination) takes no part in the near-identical
    search, so it never stands for a copy that is then dropped in its favour."""
    from PIL import Image

    pillow_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # sizes are checked first
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            size = image.size
        image_size, mode = int(ctx.spec.image_size or 0), ctx.spec.resize_mode
        if image_problem(*size, ctx.spec.filters) or jpeg_side_problem(size, size, image_size, mode):
            return None
        phash = image_phash(source)
    except Exception as err:  # the write pass rejects it with its reason
        log.debug("no perceptual hash: %s: %s", type(err).__name__, err)
        return None
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit
    if phash is None or check_signature(ctx, phash, [caption]) is not None:
        return None
    return phash


def image_dedup_plan(ctx: BuildContext) -> DedupPlan | None:
    """The near-identical image search of a spec with ``dedup.image`` (None without)."""
    rule = ctx.spec.dedup.image
    if rule is None:
        return None
    near = NearRule("phash", rule.max_distance + 1, rule.max_distance, "near_duplicate_image")
    return DedupPlan(str(ctx.out / "dedup"), ctx.spec.dedup.partitions, False, near)


def scan_results(ctx: BuildContext, unit: int) -> tuple[dict[str, Drop], dict[str, np.ndarray]]:
    """What the write pass of one unit takes from its ``dedup.image`` scan: (``image_drops``,
    ``scanned_phashes``); both empty without ``dedup.image``."""
    return image_drops(ctx, unit), scanned_phashes(ctx, unit)


def scanned_phashes(ctx: BuildContext, unit: int) -> dict[str, np.ndarray]:
    """Sample key -> the perceptual hash the ``dedup.image`` scan computed for a kept image of this
    unit (empty without ``dedup.image``), so the write pass checks it against the eval index without
    hashing the image again."""
    plan = image_dedup_plan(ctx)
    if plan is None:
        return {}
    signatures = np.load(plan.path("scan", f"{unit:05d}.sig.npy"))
    return dict(zip(scan_wheres(plan, unit), signatures, strict=True))


def contamination(
    ctx: BuildContext, known: dict[str, np.ndarray], key: str, image: str | Path | bytes, caption: str
) -> tuple[str, str] | None:
    """``check_sample`` for one image-text sample, with the scan's hash of its image when there is one
    (``scanned_phashes``: the same bytes, so the same hash)."""
    if (phash := known.get(key)) is not None:
        return check_signature(ctx, phash, [caption])
    return check_sample(ctx, image, [caption])


def image_drops(ctx: BuildContext, unit: int) -> dict[str, Drop]:
    """Sample key -> drop for the near-identical images of one unit (empty without ``dedup.image``)."""
    plan = image_dedup_plan(ctx)
    if plan is None:
        return {}
    wheres = scan_wheres(plan, unit)
    return {wheres[pos]: drop for pos, drop in unit_drops(plan, unit).items()}


# --- preview -------------------------------------------------------------------------------------


def write_preview(ctx: BuildContext, results: list[UnitResult]) -> Path | None:
    """``preview.png``: up to 16 train samples with their captions in a 4-column grid (PIL only)."""
    from PIL import Image, ImageDraw, ImageFont, ImageOps

    picked: list[tuple[bytes, str]] = []
    for record in (rec for r in results for rec in r.shards if rec["split"] == "train"):
        for sample in read_tar_samples(ctx.out / record["path"]):
            picked.append((sample["jpg"], sample["txt"].decode("utf-8", "replace")))
            if len(picked) >= PREVIEW_SAMPLES:
                break
        if len(picked) >= PREVIEW_SAMPLES:
            break
    if not picked:
        return None
    cols, cell, text_h = 4, PREVIEW_CELL, 48
    rows = math.ceil(len(picked) / cols)
    sheet = Image.new("RGB", (cols * cell, rows * (cell + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i, (jpg, caption) in enumerate(picked):
        x, y = (i % cols) * cell, (i // cols) * (cell + text_h)
        with Image.open(io.BytesIO(jpg)) as image:
            thumb = ImageOps.contain(image.convert("RGB"), (cell - 8, cell - 8))
        sheet.paste(thumb, (x + (cell - thumb.size[0]) // 2, y + (cell - thumb.size[1]) // 2))
        lines = textwrap.wrap(caption, width=26)
        if len(lines) > 3:
            lines = [*lines[:2], textwrap.shorten(" ".join(lines[2:]), width=26, placeholder=" ...")]
        draw.multiline_text((x + 4, y + cell), "\n".join(lines), fill=(0, 0, 0), font=font, spacing=2)
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return atomic_write_bytes(ctx.out / "preview.png", buffer.getvalue())
