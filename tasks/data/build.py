"""Dataset builds: identity, resumable units, failure ratio, manifest written last.

A build of spec S lives at ``<data_root>/builds/S/<build_id>/`` where ``build_id`` hashes the spec
content, the source fingerprint, the tokenizer hash and the builder's code version. Work is split
into units (a subset's file, or a hub dataset shard); a unit is done when its record
``units/NNNNN.json`` exists and its shards verify, so a killed build resumes where it stopped and
ends byte-identical to an uninterrupted one. ``manifest.json``, written last, marks the build done.

Corruption is repaired piece by piece: before building, stray temp files of killed writes are
deleted and every recorded shard is checked (size and sha256) once, in the driver; a unit with a
missing or corrupt shard loses its record and is rebuilt (its good shards are kept as they are),
every other unit is reused untouched. ``BuildResult.repaired`` and a WARNING per shard say what was
rebuilt and why.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.core.identity import (
    atomic_write_json,
    code_version,
    hash_json,
    read_json,
)
from tasks.data.builder import (
    BuildContext,
    Builder,
    BuildError,
    FanOut,
    UnitResult,
    reject_lines,
    unit_record_path,
    unit_rejects_path,
)
from tasks.data.contamination import IMAGE_REASON, TEXT_REASON, write_report
from tasks.data.fingerprints import resolve_tokenizer, signature_libraries, source_fingerprint
from tasks.data.shards import remove_stray_temps, shard_problem
from tasks.data.specs import load_spec
from tasks.data.verified import forget_verified, plan_check, record_verified

log = logging.getLogger(__name__)

BUILDER_COMPONENT = {
    "text": "text-builder",
    "chat": "instruct-builder",
    "instruct": "instruct-builder",
    "image_text": "image-text-builder",
}


@dataclass
class BuildResult:
    """Outcome of ``build_dataset``."""

    name: str
    """Spec name."""
    build_id: str
    """Identity."""
    path: Path
    """Build folder."""
    reused: bool
    """True when an identical verified build already existed."""
    manifest: dict[str, Any]
    """The manifest content."""
    repaired: list[dict[str, Any]] = field(default_factory=list)
    """Shards found missing or corrupt and rebuilt: ``{"shard", "reason", "unit"}`` each."""
    cleaned: list[str] = field(default_factory=list)
    """Stray temp files of interrupted writes that were deleted (paths relative to the build folder)."""


@dataclass
class BuildSummary:
    """What the data step reports of one spec's build (the ``build-data`` flow's result, as a dict)."""

    name: str
    """Spec name."""
    build_id: str
    """Identity of the build."""
    path: str
    """Build folder."""
    reused: bool
    """True when an identical verified build already existed."""
    kind: str
    """Dataset kind."""
    totals: dict[str, int]
    """``read``, ``kept``, ``rejected``, ``tokens``, ... over all units."""
    rejects: dict[str, int]
    """Rejected samples by reason."""
    shards: int
    """Shard files written."""
    spec_path: str
    """Where the spec was read from."""
    repaired: list[dict[str, Any]] = field(default_factory=list)
    """Shards found missing or corrupt and rebuilt."""
    cleaned: list[str] = field(default_factory=list)
    """Temp files of interrupted writes that were deleted."""
    catalog_repaired: list[dict[str, Any]] = field(default_factory=list)
    """Catalog rows that pointed at missing or wrong-sized shards, and what was done about them."""

    @classmethod
    def of(cls, result: BuildResult, spec_path: str | Path) -> BuildSummary:
        """The summary of a finished ``build_dataset``."""
        stats = result.manifest["stats"]
        return cls(
            result.name, result.build_id, str(result.path), result.reused, result.manifest["kind"],
            stats["totals"], stats["rejects"], len(result.manifest["shards"]), str(spec_path),
            result.repaired, result.cleaned,
        )  # fmt: skip


# --- identity ----------------------------------------------------------------------------------


def make_context(spec_path: str | Path, data_root: str | Path, eval_index: Any = None) -> BuildContext:
    """Validate the spec and compute the build identity (with the eval index's, when it decontaminates)."""
    spec = load_spec(spec_path)
    if spec.decontaminate is None:
        eval_index = None
    elif eval_index is None:
        raise BuildError(
            f"spec {spec.name}: decontaminate is set, so the build needs the eval sets of profile "
            f"{spec.profile!r}: build it with `mvlm data build {spec.name}` (in Python: "
            "tasks.quality.eval_index.build_decontaminated, or pass eval_index)"
        )
    if spec.downloads:  # published files the sources read: fetched (or verified as there) first
        from tasks.data.downloads import ensure_downloads

        ensure_downloads(spec, data_root)
    tok_path, tok_hash = resolve_tokenizer(spec, data_root)
    source = source_fingerprint(spec, data_root)
    identity = {
        "spec": spec.model_dump(mode="json"),
        "source": source,
        "tokenizer": tok_hash,
        "code": code_version(BUILDER_COMPONENT[spec.kind]),
    }
    if eval_index is not None:
        identity["eval_index"] = eval_index.digest
    if libraries := signature_libraries(spec):
        identity["libraries"] = libraries
    build_id = hash_json(identity)
    out = Path(data_root) / "builds" / spec.name / build_id
    return BuildContext(
        spec, str(spec_path), str(data_root), build_id, str(out), tok_path, tok_hash, eval_index=eval_index,
        source=source,
    )  # fmt: skip


# --- running -------------------------------------------------------------------------------------


def shard_problems(build_dir: Path, records: Iterable[dict[str, Any]], deep: bool = True) -> list[dict]:
    """``{"shard", "reason"}`` for every record whose shard is missing, has another size or (``deep``)
    another sha256; hashes on a few threads (hashlib releases the GIL)."""
    records = list(records)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        reasons = list(pool.map(lambda rec: shard_problem(build_dir, rec, deep), records))
    return [{"shard": rec["path"], "reason": why} for rec, why in zip(records, reasons, strict=True) if why]


def check_build(
    path: Path, deep: bool = True, trust_unchanged: bool = False
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """(manifest, []) for a complete build whose shards verify; (None, problems) otherwise, after
    deleting the manifest of a build with bad shards (so it is repaired, never reused).
    ``trust_unchanged``: shards unchanged since their last full check are not hashed again
    (``tasks.data.verified``)."""
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        return None, []
    manifest = read_json(manifest_path)
    if deep and trust_unchanged:
        check = plan_check(path, manifest["shards"])
        found = shard_problems(path, check.fresh) + shard_problems(path, check.unchanged, deep=False)
        bad = {p["shard"]: p for p in found}
        problems = [bad[rec["path"]] for rec in manifest["shards"] if rec["path"] in bad]  # manifest order
        if not problems and check.fresh:
            record_verified(path, check)
    else:
        problems = shard_problems(path, manifest["shards"], deep=deep)
    if not problems:
        return manifest, []
    for problem in problems:
        log.warning("build %s: shard %s is bad (%s); repairing it", path, problem["shard"], problem["reason"])
    manifest_path.unlink(missing_ok=True)
    forget_verified(path)
    return None, problems


def verify_build(path: Path, deep: bool = True) -> dict[str, Any] | None:
    """The manifest of a complete build whose shards verify, else None."""
    return check_build(path, deep)[0]


def check_units(ctx: BuildContext, known: list[dict] | None = None) -> tuple[set[int], list[dict]]:
    """Sort the recorded units of an unfinished build into verified ones and broken ones.

    ``known`` are the problems ``check_build`` just found (every other shard verified); without it,
    every recorded shard is checked now (size and sha256). A broken unit's record is deleted so the
    builder rebuilds it. Returns (verified unit indexes, ``{"shard", "reason", "unit"}`` problems).
    """
    records = {}
    for path in sorted((ctx.out / "units").glob("*.json")):
        if not path.stem.isdigit():
            continue
        try:
            records[int(path.stem)] = UnitResult(**read_json(path))
        except (ValueError, TypeError) as err:  # a torn record: rebuild that unit
            log.warning(
                "%s: unit record %s is unreadable (%s); rebuilding that unit", ctx.spec.name, path, err
            )
            path.unlink(missing_ok=True)
    if known is None:
        known = shard_problems(ctx.out, [rec for r in records.values() for rec in r.shards])
        for problem in known:
            log.warning(
                "%s: shard %s is bad (%s); rebuilding its unit",
                ctx.spec.name,
                problem["shard"],
                problem["reason"],
            )
    by_shard = {p["shard"]: {**p, "unit": None} for p in known}
    verified = set()
    for index, result in records.items():
        bad = [rec["path"] for rec in result.shards if rec["path"] in by_shard]
        if not bad:
            verified.add(index)
            continue
        for shard in bad:
            by_shard[shard]["unit"] = index
        unit_record_path(ctx, index).unlink(missing_ok=True)
    return verified, list(by_shard.values())


def finalize(
    ctx: BuildContext, results: list[UnitResult], extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Merge unit results, enforce the failure ratio, write rejects, stats and (last) the manifest."""
    reasons, contamination = merge_rejects(ctx, results)
    totals = _sum_counts(r.counts for r in results)
    per_subset = {
        s.name: _sum_counts(r.counts for r in results if r.subset == s.name) for s in ctx.spec.subsets
    }
    stats = {"totals": totals, "subsets": per_subset, "rejects": reasons}
    atomic_write_json(ctx.out / "stats.json", stats)
    if ctx.eval_index is not None:
        write_report(ctx.out, ctx.eval_index, contamination)
    read = max(totals.get("read", 0), 1)
    ratio = totals.get("rejected", 0) / read
    if ratio > ctx.spec.max_failure_ratio:
        raise BuildError(
            f"spec {ctx.spec.name}: {totals.get('rejected', 0)} of {totals.get('read', 0)} samples rejected "
            f"({ratio:.1%} > max_failure_ratio {ctx.spec.max_failure_ratio:.1%}); "
            f"reasons {reasons}; see {ctx.out / 'rejects.jsonl'}"
        )
    shards = [rec for r in results for rec in r.shards]
    if not shards:
        raise BuildError(f"spec {ctx.spec.name}: no samples survived; see {ctx.out / 'rejects.jsonl'}")
    manifest = {
        "name": ctx.spec.name,
        "kind": ctx.spec.kind,
        "profile": ctx.spec.profile,
        "build_id": ctx.build_id,
        "code_version": code_version(BUILDER_COMPONENT[ctx.spec.kind]),
        "spec": ctx.spec.model_dump(mode="json"),
        "source": ctx.source or source_fingerprint(ctx.spec, ctx.data_root),
        "tokenizer": {"path": ctx.tokenizer_path, "hash": ctx.tokenizer_hash} if ctx.tokenizer_hash else None,
        "weights": ctx.spec.weights(),
        "stats": stats,
        "shards": shards,
        **(extra or {}),
    }
    atomic_write_json(ctx.out / "manifest.json", manifest)
    return manifest


def merge_rejects(ctx: BuildContext, results: list[UnitResult]) -> tuple[dict[str, int], list[dict]]:
    """Stream every unit's reject rows, in unit order, into ``rejects.jsonl`` (no process holds them
    all); returns (rejects per reason, the eval-contamination rows the report counts)."""
    reasons: Counter[str] = Counter()
    contamination = []
    tmp = ctx.out / f".rejects.jsonl.{os.getpid()}.tmp"  # a killed merge leaves a stray temp file
    with open(tmp, "w") as out:
        for result in results:
            before = sum(reasons.values())
            for line in _unit_reject_lines(ctx, result):
                out.write(line)
                row = json.loads(line)
                reasons[row["reason"]] += 1
                if row["reason"] in (IMAGE_REASON, TEXT_REASON):
                    contamination.append(row)
            if result.reject_counts and sum(reasons.values()) - before != sum(result.reject_counts.values()):
                raise BuildError(
                    f"spec {ctx.spec.name}: unit {result.index}'s rejects file does not hold the "
                    f"{sum(result.reject_counts.values())} rejects its record counts; delete "
                    f"{unit_record_path(ctx, result.index)} and build again to redo that unit"
                )
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, ctx.out / "rejects.jsonl")
    return dict(sorted(reasons.items())), contamination


def _unit_reject_lines(ctx: BuildContext, result: UnitResult) -> Iterator[str]:
    """One unit's reject lines: from its rejects file, or from a record that still holds the rows
    (written before unit rejects files existed)."""
    if result.rejects:
        yield from reject_lines(result.rejects).splitlines(keepends=True)
        return
    path = unit_rejects_path(ctx, result.index)
    if path.is_file():
        with path.open() as handle:
            yield from handle


def _sum_counts(counts) -> dict[str, int]:
    total: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            total[k] = total.get(k, 0) + v
    return dict(sorted(total.items()))


def builder_for(kind: str) -> Builder:
    """The function that builds every unit of a spec of ``kind`` (imported here: a build needs one)."""
    if kind == "text":
        from tasks.data.text import build_text

        return build_text
    if kind == "image_text":
        from tasks.data.image_text import build_image_text

        return build_image_text
    from tasks.data.instruct import build_conversations

    return build_conversations


def default_fan_out() -> FanOut:
    """Where builders' units run: Ray tasks (local Ray, or the cluster ``RAY_ADDRESS`` names)."""
    from tasks.core.parallel import ray_map

    return ray_map


def build_dataset(
    spec_path: str | Path,
    data_root: str | Path,
    force: bool = False,
    fan_out: FanOut | None = None,
    eval_index: Any = None,
    verify_all: bool = False,
) -> BuildResult:
    """Build (or reuse, or resume) the dataset described by ``spec_path``; units run on ``fan_out``
    (default: Ray tasks). A spec with ``decontaminate`` needs ``eval_index`` (an ``EvalIndex``).
    A finished build is reused when its shards verify: those unchanged since their last full check
    by size and stat, the others by sha256; ``verify_all`` hashes every shard."""
    from tasks.core.locks import exclusive

    ctx = make_context(spec_path, data_root, eval_index)
    with exclusive(ctx.out.parent / f".{ctx.build_id}.lock"):  # a concurrent builder waits, then reuses
        if force and ctx.out.exists():
            shutil.rmtree(ctx.out)
            forget_verified(ctx.out)
        cleaned = []
        for path in remove_stray_temps(ctx.out) if ctx.out.is_dir() else []:
            cleaned.append(str(path.relative_to(ctx.out)))
            log.warning("%s: deleted %s, a temp file left by an interrupted write", ctx.spec.name, path)
        manifest, bad = check_build(ctx.out, trust_unchanged=not verify_all) if not force else (None, [])
        if manifest is not None:
            log.info("%s: build %s exists and verifies; reusing", ctx.spec.name, ctx.build_id)
            return BuildResult(ctx.spec.name, ctx.build_id, ctx.out, True, manifest, cleaned=cleaned)
        verified, repaired = check_units(ctx, bad or None)
        log.info("%s: building %s into %s", ctx.spec.name, ctx.build_id, ctx.out)
        ctx.out.mkdir(parents=True, exist_ok=True)
        ctx = dataclasses.replace(ctx, verified_units=frozenset(verified))
        results = builder_for(ctx.spec.kind)(ctx, fan_out or default_fan_out())
        manifest = finalize(ctx, results)
        if repaired:
            log.warning(
                "%s: repaired build %s: rebuilt %s", ctx.spec.name, ctx.build_id,
                ", ".join(f"{p['shard']} ({p['reason']})" for p in repaired),
            )  # fmt: skip
        return BuildResult(ctx.spec.name, ctx.build_id, ctx.out, False, manifest, repaired, cleaned)
