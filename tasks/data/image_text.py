"""Image-text builds: URL lists through img2dataset, LLaVA pretrain json from local images.

``url_list`` subsets (CC3M style): the list is read, every URL is checked against the URL policy
(http/https only; loopback, private, link-local and metadata hosts refused unless the spec's
``allow_hosts`` lists them), exact duplicate URLs and bad captions are set aside, and the clean rows
go to img2dataset (its own venv, run as a program, ``tasks.data.img2dataset_runner``) in the build's
``work/`` folder. Its per-shard stats are checked and its per-sample statuses become rejects by
reason (``http_404``, ``timeout``, ``decode_error``, ...). Units: one for the list (the rows refused
before download) and one per img2dataset shard.

``llava_json`` subsets (LLaVA-Pretrain-558K): no download; images are read under ``image_root``
(absolute paths, ``..`` and symlinks leaving the root are refused), resized with PIL the way
img2dataset's ``resize_mode`` does it and re-encoded as JPEG quality 95. Units: ``shard_samples``
entries each.

A second pass (Ray, one task per unit) filters captions and images, assigns the held-out split by
a stable hash of the sample key and writes the final shards ``shards/{train,heldout}/*.tar`` in
img2dataset's per-sample layout: ``{key}.jpg``, ``{key}.txt``, ``{key}.json`` (json without timings
or ports, so a resumed build is byte-identical). ``preview.png`` shows up to 16 train samples.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import logging
import math
import os
import re
import tarfile
import textwrap
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

from tasks.core.identity import atomic_write_bytes, sha256_file
from tasks.data.bounded_read import bounded_lines, line_limit, load_whole_json, oversized_detail
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
from tasks.data.dedup import (
    DedupPlan,
    Drop,
    NearRule,
    UnitKeys,
    run_reduce,
    scan_record,
    scan_wheres,
    unit_drops,
)
from tasks.data.image_checks import (
    ImageRejected,
    caption_problem,
    normalise_caption,
    normalise_image,
    sample_key,
    split_for,
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
from tasks.data.rejects import Rejects
from tasks.data.shard_read import read_tar_samples
from tasks.data.shards import write_shard
from tasks.data.signatures import image_phash
from tasks.data.specs import Filters, LlavaSource, Subset, UrlListSource
from tasks.data.url_policy import LOCAL_PLACEHOLDER, HostPolicy, url_problem

log = logging.getLogger(__name__)

PREVIEW_SAMPLES = 16
PREVIEW_CELL = 160
VALIDATION_BASE = "http://127.0.0.1"
"""Stands for the local server while URLs are checked (the server binds 127.0.0.1; its port comes later)."""
I2D_COLUMNS = ("row", "src_url")
"""Columns img2dataset keeps beside each sample: the list row and the URL as written in the list."""


# --- writing a unit ------------------------------------------------------------------------------


@dataclass
class _UnitWriter:
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


# --- url lists -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ListRow:
    """One row of a URL list."""

    where: str
    """``row N`` (0-based data row) or ``line N`` for rows that did not parse."""
    url: str | None
    """URL as written (may contain ``{LOCAL_SERVER}``)."""
    caption: str | None
    """Caption as written."""
    problem: str = ""
    """Parse problem of the row, if any."""
    reason: str = "invalid_row"
    """Reject reason when ``problem`` is set: ``invalid_row``, ``invalid_utf8`` or ``oversized_line``."""


def read_url_list(path: str, src: UrlListSource, filters: Filters | None = None) -> list[ListRow]:
    """Rows of a TSV (no quoting), CSV or parquet list; rows with the wrong number of fields, invalid
    UTF-8 or (TSV) more than ``filters.max_line_bytes`` come back with a problem. TSV lines are read with
    that bound, so one huge line never sits in memory whole."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    filters = filters or Filters()
    name = path.lower()
    if not name.endswith((".csv", ".csv.gz", ".parquet")):
        return _read_tsv(path, src, line_limit(filters, filters.max_caption_chars))
    bad: list[ListRow] = []
    if name.endswith(".parquet"):
        table = pq.read_table(path)
    else:

        def skip(row: Any) -> str:
            bad.append(
                ListRow(f"line {row.number}", None, None, f"{row.actual_columns} fields: {row.text[:200]}")
            )
            return "skip"

        parse = pacsv.ParseOptions(delimiter=",", quote_char='"', invalid_row_handler=skip)
        types = {src.url_col: pa.binary(), src.caption_col: pa.binary()}
        try:
            table = pacsv.read_csv(
                path,
                read_options=pacsv.ReadOptions(use_threads=False),
                parse_options=parse,
                convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=False),
            )
        except pa.ArrowInvalid as err:
            raise BuildError(f"{path}: cannot parse the CSV list ({err})") from err
    missing = [c for c in (src.url_col, src.caption_col) if c not in table.column_names]
    if missing:
        raise BuildError(f"{path}: column(s) {missing} not found; the list has {table.column_names}")
    urls = table.column(src.url_col).to_pylist()
    captions = table.column(src.caption_col).to_pylist()
    rows = []
    for i, (url, caption) in enumerate(zip(urls, captions, strict=True)):
        try:
            url, caption = (v.decode("utf-8") if isinstance(v, bytes) else v for v in (url, caption))
        except UnicodeDecodeError as err:
            bad.append(ListRow(f"row {i}", None, None, f"not UTF-8: {err}", "invalid_utf8"))
            continue
        rows.append(ListRow(f"row {i}", url, caption))
    return rows + bad


def _read_tsv(path: str, src: UrlListSource, limit: int) -> list[ListRow]:
    """A TSV list (``.gz`` too): header line, then ``url<TAB>caption`` lines; no line read past ``limit``
    bytes. Blank lines are skipped; ``row N`` counts the rows that parsed."""

    rows: list[ListRow] = []
    bad: list[ListRow] = []
    opener = gzip.open if path.lower().endswith(".gz") else open
    with opener(path, "rb") as handle:
        lines = bounded_lines(handle, limit)
        header = next(lines, None)
        if header is None or header.data is None:
            raise BuildError(f"{path}: no header line (or one over {limit} bytes) in the URL list")
        try:
            columns = header.data.decode("utf-8").split("\t")
        except UnicodeDecodeError as err:
            raise BuildError(f"{path}: the header line is not UTF-8 ({err})") from err
        missing = [c for c in (src.url_col, src.caption_col) if c not in columns]
        if missing:
            raise BuildError(f"{path}: column(s) {missing} not found; the list has {columns}")
        url_at, caption_at = columns.index(src.url_col), columns.index(src.caption_col)
        for line in lines:
            where = f"line {line.number}"
            if line.data is None:
                detail = oversized_detail(line, limit, "max_caption_chars")
                bad.append(ListRow(where, None, None, detail, "oversized_line"))
                continue
            if not line.data:
                continue
            try:
                text = line.data.decode("utf-8")
            except UnicodeDecodeError as err:
                excerpt = line.data[:200].decode("utf-8", "replace")
                bad.append(ListRow(where, None, None, f"not UTF-8 ({err}): {excerpt}", "invalid_utf8"))
                continue
            fields = text.split("\t")
            if len(fields) != len(columns):
                bad.append(ListRow(where, None, None, f"{len(fields)} fields: {text[:200]}"))
                continue
            rows.append(ListRow(f"row {len(rows)}", fields[url_at], fields[caption_at]))
    return rows + bad


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
    writer = _UnitWriter(ctx, unit)
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


def process_url_shard(job: UrlShardJob, ctx: BuildContext) -> UnitResult:
    """Turn one img2dataset shard into final shards: failures become rejects, filters apply."""
    raw = Path(job.raw_dir)
    stats = read_stats(raw, job.shard_id, job.count)
    rows = read_status_rows(raw, job.shard_id)
    tar_path = shard_files(raw, job.shard_id)[0]
    writer = _UnitWriter(ctx, job.unit)
    with tarfile.open(tar_path) as tar:
        index = _tar_index(tar)
        successes = {r["key"] for r in rows if r["status"] == "success"}
        if len(rows) != stats.count or successes != set(index) or len(successes) != stats.successes:
            raise Img2DatasetError(
                f"{tar_path}: {len(index)} samples in the tar, {len(successes)} successes and "
                f"{len(rows)} rows in the parquet, stats say {stats.successes} of {stats.count}"
            )

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
                if bad := check_sample(ctx, raw_bytes, [caption]):
                    writer.reject(bad[0], source, where, bad[1], caption)
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
                yield writer.keep(sample_key(job.unit.subset, row["key"]), image.jpeg, caption, meta)

        return writer.finish(samples())


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
    writer = _UnitWriter(ctx, job.unit)
    source = job.unit.source.split("#", 1)[0]
    entries = sorted(job.entries, key=lambda e: e.get("key", ""))
    drops = image_drops(ctx, job.unit.index)

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
            if bad := check_sample(ctx, path, [caption]):
                writer.reject(bad[0], source, where, bad[1], entry["image"])
                continue
            if (drop := drops.get(entry["key"])) is not None:
                writer.reject(
                    drop.reason, source, where, f"near-identical image of {drop.kept}", entry["image"]
                )
                continue
            jpg, sizes, bad = load_local_image(path, ctx)
            if jpg is None:
                writer.reject(bad[0], source, where, bad[1], entry["image"])
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


def image_dedup_plan(ctx: BuildContext) -> DedupPlan | None:
    """The near-identical image search of a spec with ``dedup.image`` (None without)."""
    rule = ctx.spec.dedup.image
    if rule is None:
        return None
    near = NearRule("phash", rule.max_distance + 1, rule.max_distance, "near_duplicate_image")
    return DedupPlan(str(ctx.out / "dedup"), ctx.spec.dedup.partitions, False, near)


def scan_llava(job: LlavaJob, ctx: BuildContext) -> dict[str, Any]:
    """Perceptual hashes of one chunk's usable images (``dedup.image``), keyed by sample key."""
    plan = image_dedup_plan(ctx)
    assert plan is not None
    if (done := scan_record(plan, job.unit.index)) is not None:
        return done
    root = Path(job.image_root).resolve()
    keys = UnitKeys(plan)
    for entry in sorted(job.entries, key=lambda e: e.get("key", "")):
        usable = "reason" not in entry and not caption_problem(
            normalise_caption(entry["caption"]), ctx.spec.filters
        )
        path = image_under_root(root, entry["image"])[0] if usable else None
        try:
            phash = image_phash(path) if path is not None else None
        except (OSError, ValueError):  # the write pass rejects it with its reason
            phash = None
        if phash is not None:
            keys.add(hashlib.sha256(entry["key"].encode()).hexdigest(), entry["key"], phash)
    return keys.save(job.unit.index, job.unit.subset, job.unit.source, {"read": len(job.entries)})


def image_drops(ctx: BuildContext, unit: int) -> dict[str, Drop]:
    """Sample key -> drop for the near-identical images of one unit (empty without ``dedup.image``)."""
    plan = image_dedup_plan(ctx)
    if plan is None:
        return {}
    wheres = scan_wheres(plan, unit)
    return {wheres[pos]: drop for pos, drop in unit_drops(plan, unit).items()}


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


# --- the build -----------------------------------------------------------------------------------


def process_job(job: UrlShardJob | LlavaJob, ctx: BuildContext) -> UnitResult:
    """Ray task body: one unit of the second pass."""
    if isinstance(job, UrlShardJob):
        return process_url_shard(job, ctx)
    return process_llava(job, ctx)


def build_image_text(ctx: BuildContext, fan_out: FanOut) -> list[UnitResult]:
    """Every unit of an image-text spec (finished units are reused), then the preview."""
    done: list[UnitResult] = []
    jobs: list[UrlShardJob | LlavaJob] = []
    llava: list[LlavaJob] = []
    next_index = 0
    for sub in ctx.spec.subsets:
        if isinstance(sub.source, UrlListSource):
            plan = plan_url_subset(ctx, sub, next_index)
            next_index += 1 + len(plan.units)
            done.append(finished_unit(ctx, plan.list_unit.index) or save_unit(ctx, plan.list_result))
            pending = []
            for k, unit in enumerate(plan.units):
                if (result := finished_unit(ctx, unit.index)) is not None:
                    done.append(result)
                else:
                    pending.append(k)
            if pending:
                download_subset(ctx, plan, pending)
            raw = str(ctx.out / plan.work / "img2dataset")
            size = ctx.spec.shard_samples
            jobs += [
                UrlShardJob(plan.units[k], raw, k, len(plan.rows[k * size : (k + 1) * size])) for k in pending
            ]
        else:
            chunks = plan_llava_subset(ctx, sub, next_index)
            llava += chunks  # all of them: near-identical images are searched across the whole build
            next_index += len(chunks)
            for job in chunks:
                if (result := finished_unit(ctx, job.unit.index)) is not None:
                    done.append(result)
                else:
                    jobs.append(job)
    if jobs:
        log.debug("%s: %d units to write (%d reused)", ctx.spec.name, len(jobs), len(done))
    if (plan := image_dedup_plan(ctx)) is not None and jobs:
        scans = fan_out(scan_llava, llava, ctx, label=f"{ctx.spec.name}: image hashes")
        run_reduce(plan, scans, fan_out, ctx.spec.name)
    results = fan_out(process_job, jobs, ctx, label=f"{ctx.spec.name}: filter+shard")
    merged = sorted([*done, *results], key=lambda r: r.index)
    write_preview(ctx, merged)
    return merged


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
