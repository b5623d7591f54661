"""The builder protocol: what the build driver hands a builder, and what a builder hands back.

A builder (text, image-text, instruct) turns a spec's sources into shards, one unit of work at a
time. It decides *what* each unit does; the driver (``tasks.data.build``) decides *where* it runs: it
passes a ``FanOut`` (Ray tasks by default, a plain loop in tests) that the builder maps its
per-unit function over. A unit is done when its record ``units/NNNNN.json`` exists and its shards
verify (``finished_unit``); ``save_unit`` writes that record once the unit's shards are written.
"""

from __future__ import annotations

import dataclasses
import glob as globlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from tasks.core import faults
from tasks.core.identity import atomic_write_json, atomic_write_text, read_json
from tasks.data.shards import shard_problem
from tasks.data.specs import DatasetSpec

log = logging.getLogger(__name__)
T = TypeVar("T")


class FanOut(Protocol):
    """``fan_out(fn, items, *shared, label=...)`` == ``[fn(item, *shared) for item in items]``, run
    wherever the driver chose (``tasks.core.parallel.ray_map`` by default)."""

    def __call__(
        self, fn: Callable[..., T], items: Sequence[Any], *args: Any, label: str = ...
    ) -> list[T]: ...


def serial_map(fn: Callable[..., T], items: Sequence[Any], *args: Any, label: str = "work") -> list[T]:
    """A ``FanOut`` that runs every item here, in order (tests, debugging)."""
    return [fn(item, *args) for item in items]


class BuildError(RuntimeError):
    """A build that cannot complete; the message says which spec, what and what to do."""


@dataclass(frozen=True)
class Unit:
    """One piece of work: a subset's file or a hub dataset shard."""

    index: int
    """Position in the build's unit list (stable for a given spec and source)."""
    subset: str
    """Subset name."""
    source: str
    """Absolute file path, or ``hf:<shard index>`` for hub datasets."""


@dataclass
class UnitResult:
    """What a unit produced: shard records, counts and rejects."""

    index: int
    """The unit's index."""
    subset: str
    """Subset name."""
    shards: list[dict[str, Any]] = field(default_factory=list)
    """ShardRecord dicts, in writing order."""
    counts: dict[str, int] = field(default_factory=dict)
    """``read``, ``kept``, ``rejected``, ``tokens``, ... for this unit."""
    rejects: list[dict[str, str]] = field(default_factory=list)
    """Reject rows (tasks.data.rejects.Reject as dicts) until ``save_unit`` writes them to the unit's
    rejects file; a saved result carries ``reject_counts`` only, so the driver never holds the rows."""
    reject_counts: dict[str, int] = field(default_factory=dict)
    """Rejects per reason (set by ``save_unit``)."""


@dataclass(frozen=True)
class BuildContext:
    """Everything a builder needs, picklable for Ray workers."""

    spec: DatasetSpec
    """The validated spec."""
    spec_path: str
    """Where the spec was read from."""
    data_root: str
    """Root that relative paths resolve against."""
    build_id: str
    """Identity of this build."""
    out_dir: str
    """Build folder."""
    tokenizer_path: str | None
    """Resolved tokenizer folder or hub id (text kinds)."""
    tokenizer_hash: str | None
    """Hash of the tokenizer (part of the identity)."""
    verified_units: frozenset[int] = frozenset()
    """Units whose shards the driver verified just before this build (workers do not hash them again)."""
    eval_index: Any = None
    """``tasks.data.contamination.EvalIndex`` of the spec's profile when it asks to be decontaminated."""
    source: dict[str, Any] = field(default_factory=dict)
    """The source fingerprint computed at plan time (part of the identity; remote files are fetched
    as it describes them, so the data read is the data identified)."""

    @property
    def out(self) -> Path:
        """Build folder as a Path."""
        return Path(self.out_dir)


def resolve_path(data_root: str | Path, path: str) -> str:
    """A spec path: URLs and absolute paths as they are, relative ones under the data root."""
    if "://" in path or os.path.isabs(path):
        return path
    return str(Path(data_root) / path)


def expand_files(data_root: str | Path, patterns: list[str]) -> list[str]:
    """Files matched by the spec's paths/globs, sorted per pattern; a pattern matching nothing is an error."""
    files: list[str] = []
    for pattern in patterns:
        resolved = resolve_path(data_root, pattern)
        if "://" in resolved:
            files.append(resolved)
            continue
        matches = sorted(globlib.glob(resolved)) if any(c in resolved for c in "*?[") else [resolved]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise BuildError(
                f"source path {pattern!r} matched no file (looked for {resolved}); put the file there or "
                "fix the path in the spec"
            )
        files.extend(matches)
    return files


def unit_record_path(ctx: BuildContext, index: int) -> Path:
    """Where a unit's completion record lives."""
    return ctx.out / "units" / f"{index:05d}.json"


def unit_rejects_path(ctx: BuildContext, index: int) -> Path:
    """Where a finished unit's reject rows live (json lines, in source order; merged into rejects.jsonl)."""
    return ctx.out / "units" / f"{index:05d}.rejects.jsonl"


def reject_lines(rows: list[dict[str, str]]) -> str:
    """Reject rows as the json lines of ``rejects.jsonl`` (fields truncated as ``Reject`` does)."""
    from tasks.data.rejects import Reject

    return "".join(json.dumps(asdict(Reject(**row)), sort_keys=True) + "\n" for row in rows)


def finished_unit(ctx: BuildContext, index: int) -> UnitResult | None:
    """A unit already done whose shards all verify, else None."""
    path = unit_record_path(ctx, index)
    if not path.is_file():
        return None
    result = UnitResult(**read_json(path))
    if result.reject_counts and not unit_rejects_path(ctx, index).is_file():
        log.warning("%s: unit %d lost its rejects file; rebuilding that unit", ctx.spec.name, index)
        return None
    if index in ctx.verified_units:
        return result
    problems = [(rec["path"], why) for rec in result.shards if (why := shard_problem(ctx.out, rec))]
    if not problems:
        return result
    for shard, why in problems:
        log.warning(
            "%s: unit %d shard %s is bad (%s); rebuilding that unit", ctx.spec.name, index, shard, why
        )
    return None


def save_unit(ctx: BuildContext, result: UnitResult) -> UnitResult:
    """Record a finished unit (after its shards are written): its reject rows go to the unit's rejects
    file, then the record; returns the result without the rows (what travels back to the driver)."""
    counts: dict[str, int] = {}
    for row in result.rejects:
        counts[row["reason"]] = counts.get(row["reason"], 0) + 1
    atomic_write_text(unit_rejects_path(ctx, result.index), reject_lines(result.rejects))
    saved = dataclasses.replace(result, rejects=[], reject_counts=dict(sorted(counts.items())))
    faults.hit("unit-commit")
    atomic_write_json(unit_record_path(ctx, result.index), asdict(saved))
    return saved


Builder = Callable[["BuildContext", FanOut], list["UnitResult"]]
"""``builder(ctx, fan_out)``: every unit's result, in unit order (finished units reused)."""
