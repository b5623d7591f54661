"""``url_list`` subsets (CC3M style) of image-text builds.

The list is read, every URL is checked against the URL policy (http/https only; loopback, private,
link-local and metadata hosts refused unless the spec's ``allow_hosts`` lists them), exact duplicate
URLs and bad captions are set aside, and the clean rows go to img2dataset (its own venv, run as a
program, ``tasks.data.img2dataset_runner``) in the build's ``work/`` folder. Its per-shard stats are
checked and its per-sample statuses become rejects by reason (``http_404``, ``timeout``,
``decode_error``, ...). Units: one for the list (the rows refused before download) and one per
img2dataset shard.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.data.builder import (
    BuildContext,
    BuildError,
    Unit,
    UnitResult,
    expand_files,
    resolve_path,
)
from tasks.data.dedup import UnitKeys, forget_reduce, scan_record
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
from tasks.data.img2dataset_runner import (
    DownloadOptions,
    Img2DatasetError,
    failure_reason,
    forget_shard,
    read_stats,
    read_status_rows,
    run_img2dataset,
    shard_files,
)
from tasks.data.specs import Subset, UrlListSource
from tasks.data.url_policy import LOCAL_PLACEHOLDER, HostPolicy, url_problem
from tasks.data.url_rows import read_url_list

log = logging.getLogger(__name__)


VALIDATION_BASE = "http://127.0.0.1"
"""Stands for the local server while URLs are checked (the server binds 127.0.0.1; its port comes later)."""
I2D_COLUMNS = ("row", "src_url")
"""Columns img2dataset keeps beside each sample: the list row and the URL as written in the list."""


@dataclass
class UrlPlan:
    """A URL-list subset ready to download: its list unit, clean rows and shard units."""

    subset: Subset
    """The spec subset."""
    list_unit: Unit
    """The unit holding the rows refused before download."""
    list_result: UnitResult
    """Its (unsaved) result."""
    rows: list[dict[str, Any]]
    """Clean rows in list order: ``src_url``, ``caption`` (normalised), ``row``."""
    units: list[Unit]
    """One per img2dataset shard, in shard order."""

    @property
    def work(self) -> Path:
        """Relative work folder of this subset."""
        return Path("work") / self.subset.name


def plan_url_subset(ctx: BuildContext, sub: Subset, first_index: int) -> UrlPlan:
    """Read and check a URL list; refused rows go to the list unit, the rest are split into shard units."""
    src = sub.source
    assert isinstance(src, UrlListSource)
    path = expand_files(ctx.data_root, [src.path])[0]
    policy = HostPolicy.from_allow(ctx.spec.allow_hosts)
    unit = Unit(first_index, sub.name, path)
    writer = UnitWriter(ctx, unit)
    clean: list[dict[str, Any]] = []
    seen: set[str] = set()
    for row in read_url_list(path, src, ctx.spec.filters):
        if row.problem:
            writer.reject(row.reason, path, row.where, row.problem)
            continue
        url = (row.url or "").strip()
        check = url.replace(LOCAL_PLACEHOLDER, VALIDATION_BASE) if src.local_server else url
        if why := url_problem(check, policy):
            writer.reject("url_refused", url or path, row.where, why, row.caption or "")
            continue
        caption = normalise_caption(row.caption)
        if bad := caption_problem(caption, ctx.spec.filters):
            writer.reject(bad[0], url, row.where, bad[1], row.caption or "")
            continue
        if ctx.spec.dedup.exact and url in seen:
            writer.reject("duplicate", url, row.where, "the same URL appears earlier in the list")
            continue
        seen.add(url)
        clean.append({"src_url": url, "caption": caption, "row": int(row.where.split()[1])})
    writer.counts["listed"] = writer.counts["read"] + len(clean)
    result = UnitResult(unit.index, unit.subset, [], dict(writer.counts), writer.rejects.to_rows())
    shards = math.ceil(len(clean) / ctx.spec.shard_samples)
    units = [Unit(first_index + 1 + k, sub.name, f"{path}#shard{k}") for k in range(shards)]
    if writer.counts["rejected"]:
        log.info(
            "%s/%s: %d of %d rows refused before download: %s",
            ctx.spec.name,
            sub.name,
            writer.counts["rejected"],
            writer.counts["listed"],
            writer.rejects.counts(),
        )
    return UrlPlan(sub, unit, result, clean, units)


def download_options(ctx: BuildContext) -> DownloadOptions:
    """img2dataset options from the spec (processes/threads/timeout overridable by environment)."""
    cpus = os.cpu_count() or 1
    return DownloadOptions(
        image_size=int(ctx.spec.image_size or 0),
        resize_mode=ctx.spec.resize_mode,
        shard_samples=ctx.spec.shard_samples,
        additional_columns=I2D_COLUMNS,
        processes=int(os.environ.get("MVLM_IMG2DATASET_PROCESSES", max(1, min(4, cpus // 2)))),
        threads=int(os.environ.get("MVLM_IMG2DATASET_THREADS", 16)),
        timeout=int(os.environ.get("MVLM_IMG2DATASET_TIMEOUT", 10)),
        allow_hosts=tuple(ctx.spec.allow_hosts),
        max_image_pixels=ctx.spec.filters.max_image_pixels,
    )


def _raw_shard_ok(raw: Path, shard_id: int, expected: int) -> bool:
    """True when img2dataset's files for a shard are complete and consistent."""
    import pyarrow.parquet as pq

    tar_path, parquet_path, _ = shard_files(raw, shard_id)
    try:
        stats = read_stats(raw, shard_id, expected)
        if pq.read_metadata(parquet_path).num_rows != stats.count:
            return False
        with tarfile.open(tar_path) as tar:
            members = sum(1 for m in tar if m.isfile())
        return members == 3 * stats.successes
    except (Img2DatasetError, OSError, tarfile.TarError, ValueError, KeyError):
        return False


def download_subset(ctx: BuildContext, plan: UrlPlan, pending: list[int]) -> None:
    """Run img2dataset for the pending shards of a URL subset (finished shards are kept: incremental)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = plan.subset.source
    assert isinstance(src, UrlListSource)
    raw = ctx.out / plan.work / "img2dataset"
    size = ctx.spec.shard_samples
    counts = {k: len(plan.rows[k * size : (k + 1) * size]) for k in pending}
    todo = [k for k in pending if not _raw_shard_ok(raw, k, counts[k])]
    for k in todo:
        forget_shard(raw, k)
    if todo:
        label = f"{ctx.spec.name}/{plan.subset.name}"
        log.info("%s: downloading %d of %d shards with img2dataset", label, len(todo), len(plan.units))
        with contextlib.ExitStack() as stack:
            base = None
            if src.local_server:
                from tasks.data.local_server import serve_directory, substitute_server

                root = Path(resolve_path(ctx.data_root, src.local_server.root))
                base = stack.enter_context(serve_directory(root))
            urls = [substitute_server(r["src_url"], base) if base else r["src_url"] for r in plan.rows]
            table = pa.table(
                {
                    "url": urls,
                    "caption": [r["caption"] for r in plan.rows],
                    "row": pa.array([r["row"] for r in plan.rows], pa.int64()),
                    "src_url": [r["src_url"] for r in plan.rows],
                }
            )
            input_path = ctx.out / plan.work / "input.parquet"
            input_path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, input_path)
            try:
                run_img2dataset(input_path, raw, download_options(ctx), label=label)
            except Img2DatasetError as err:
                raise BuildError(f"spec {ctx.spec.name}: {err}") from err
            except FileNotFoundError as err:
                raise BuildError(f"spec {ctx.spec.name}: {err}") from err
    for k in pending:
        try:
            read_stats(raw, k, counts[k])
        except Img2DatasetError as err:
            raise BuildError(f"spec {ctx.spec.name}: {err}") from err


@dataclass(frozen=True)
class UrlShardJob:
    """Second pass over one img2dataset shard."""

    unit: Unit
    """The unit."""
    raw_dir: str
    """img2dataset's output folder."""
    shard_id: int
    """img2dataset shard id."""
    count: int
    """Rows given to that shard."""


def _tar_index(tar: tarfile.TarFile) -> dict[str, dict[str, tarfile.TarInfo]]:
    """Members of an img2dataset tar by key and extension (links and paths refused)."""
    index: dict[str, dict[str, tarfile.TarInfo]] = {}
    for member in tar:
        if not member.isfile() or "/" in member.name or "\\" in member.name or member.name.startswith("."):
            raise Img2DatasetError(f"{tar.name}: unexpected tar member {member.name!r}")
        key, _, ext = member.name.partition(".")
        index.setdefault(key, {})[ext] = member
    return index


@contextlib.contextmanager
def _opened_shard(job: UrlShardJob) -> Iterator[tuple[list[dict[str, Any]], tarfile.TarFile, dict]]:
    """An img2dataset shard's status rows, its tar and the tar's index, checked against its stats."""
    raw = Path(job.raw_dir)
    stats = read_stats(raw, job.shard_id, job.count)
    rows = read_status_rows(raw, job.shard_id)
    tar_path = shard_files(raw, job.shard_id)[0]
    with tarfile.open(tar_path) as tar:
        index = _tar_index(tar)
        successes = {r["key"] for r in rows if r["status"] == "success"}
        if len(rows) != stats.count or successes != set(index) or len(successes) != stats.successes:
            raise Img2DatasetError(
                f"{tar_path}: {len(index)} samples in the tar, {len(successes)} successes and "
                f"{len(rows)} rows in the parquet, stats say {stats.successes} of {stats.count}"
            )
        yield rows, tar, index


def process_url_shard(job: UrlShardJob, ctx: BuildContext) -> UnitResult:
    """Turn one img2dataset shard into final shards: failures become rejects, filters apply."""
    writer = UnitWriter(ctx, job.unit)
    drops, hashed = scan_results(ctx, job.unit.index)
    with _opened_shard(job) as (rows, tar, index):

        def samples() -> Iterator[dict[str, Any]]:
            for row in rows:
                source, where = row["src_url"], f"row {row['row']}"
                if row["status"] != "success":
                    reason = failure_reason(row["status"], row.get("error_message"))
                    writer.reject(reason, source, where, row.get("error_message") or row["status"])
                    continue
                caption = normalise_caption(row.get("caption"))
                if bad := caption_problem(caption, ctx.spec.filters):
                    writer.reject(bad[0], source, where, bad[1], caption)
                    continue
                raw_bytes = tar.extractfile(index[row["key"]]["jpg"]).read()  # as downloaded
                try:
                    image = normalise_image(
                        raw_bytes,
                        ctx.spec.filters,
                        int(ctx.spec.image_size or 0),
                        ctx.spec.resize_mode,
                        source,
                    )
                except ImageRejected as err:
                    writer.reject(err.reason, source, where, err.detail)
                    continue
                key = sample_key(job.unit.subset, row["key"])
                if bad := contamination(ctx, hashed, key, raw_bytes, caption):
                    writer.reject(bad[0], source, where, bad[1], caption)
                    continue
                if (drop := drops.get(key)) is not None:
                    writer.reject(drop.reason, source, where, f"near-identical image of {drop.kept}", caption)
                    continue
                meta = {
                    "source_key": row["key"],
                    "subset": job.unit.subset,
                    "url": source,
                    "row": row["row"],
                    "status": "success",
                    **image.meta(),
                    "sha256": hashlib.sha256(raw_bytes).hexdigest(),
                }
                yield writer.keep(key, image.jpeg, caption, meta)

        return writer.finish(samples())


def scan_url_shard(job: UrlShardJob, ctx: BuildContext) -> dict[str, Any]:
    """Perceptual hashes of one img2dataset shard's downloaded images (``dedup.image``), by sample key."""
    plan = image_dedup_plan(ctx)
    assert plan is not None
    tar_path = shard_files(Path(job.raw_dir), job.shard_id)[0]
    stat = tar_path.stat() if tar_path.is_file() else None
    raw = f"{stat.st_size}:{stat.st_mtime_ns}" if stat else None
    if (done := scan_record(plan, job.unit.index)) is not None:
        if raw is None or done["counts"].get("raw") == raw:  # no tar: the unit is written already
            return done
        log.warning(
            "%s: img2dataset shard %d was downloaded again: hashing it again", ctx.spec.name, job.shard_id
        )
        forget_reduce(plan)
    keys = UnitKeys(plan)
    with _opened_shard(job) as (rows, tar, index):
        for row in rows:
            caption = normalise_caption(row.get("caption"))
            if row["status"] != "success" or caption_problem(caption, ctx.spec.filters):
                continue
            phash = keepable_phash(tar.extractfile(index[row["key"]]["jpg"]).read(), ctx, caption)
            if phash is None:  # the write pass rejects it with its reason
                continue
            key = sample_key(job.unit.subset, row["key"])
            keys.add(hashlib.sha256(key.encode()).hexdigest(), key, phash)
    return keys.save(job.unit.index, job.unit.subset, job.unit.source, {"read": len(rows), "raw": raw})
