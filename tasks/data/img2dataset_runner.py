"""img2dataset as a program: it lives in its own virtual environment and is run as a subprocess.

img2dataset pins an old webdataset and pulls the ``dataclasses`` backport (which breaks Prefect), so
``make setup`` installs it into ``.venv-img2dataset`` (target ``.venv-img2dataset/.installed``) and
this module finds the executable there, or at ``MVLM_IMG2DATASET``. The run's log is streamed to
``logging``; afterwards every shard's ``NNNNN_stats.json`` is read and checked, and the per-sample
``NNNNN.parquet`` (status and error message of every URL) names each failure.

Output layout of img2dataset (``--output_format webdataset``), per shard id ``NNNNN``:
``NNNNN.tar`` (``{key}.jpg``, ``{key}.txt``, ``{key}.json`` for the successes; with
``--disable_all_reencoding`` the ``.jpg`` member holds the bytes as downloaded, whatever their format),
``NNNNN.parquet`` (one row per input row: key, status, error_message, sizes, the saved additional columns) and
``NNNNN_stats.json`` (count, successes, failed_to_download, failed_to_resize, status_dict, timings),
written last; ``--incremental_mode incremental`` skips the shards whose stats file exists.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
tool_log = logging.getLogger("img2dataset")
"""The tool's own output, line by line (the CLI keeps it in its log file, off the console)."""

REPO = Path(__file__).resolve().parents[2]
ENV_VAR = "MVLM_IMG2DATASET"
MAKE_TARGET = ".venv-img2dataset/.installed"
DEFAULT_EXECUTABLE = REPO / ".venv-img2dataset" / "bin" / "img2dataset"
OOM_SHARD_COUNT = 5
"""img2dataset's default ``--oom_shard_count``: shard file names have 5 digits."""
TAIL_LINES = 40
GUARD_DIR = Path(__file__).resolve().parent / "egress_guard"
"""Folder put on img2dataset's ``PYTHONPATH``: its ``sitecustomize.py`` installs the egress guard."""
GUARD_BANNER = "mvlm egress guard active"
_HTTP_ERROR = re.compile(r"HTTP Error (\d{3})")
_FILTER_MESSAGES = {
    "image too small": "image_too_small",
    "image area too large": "image_too_large",
    "aspect ratio too large": "bad_aspect_ratio",
}


class Img2DatasetNotFound(FileNotFoundError):
    """The img2dataset executable is not installed where we look."""


class Img2DatasetError(RuntimeError):
    """img2dataset failed, or its output does not add up."""


@dataclass(frozen=True)
class DownloadOptions:
    """The img2dataset options a build sets (the rest keep img2dataset's defaults)."""

    image_size: int
    """``--image_size``."""
    resize_mode: str
    """``--resize_mode`` (keep_ratio: the smaller side becomes image_size)."""
    shard_samples: int
    """``--number_sample_per_shard``."""
    url_col: str = "url"
    """``--url_col``."""
    caption_col: str = "caption"
    """``--caption_col``."""
    input_format: str = "parquet"
    """``--input_format``."""
    additional_columns: tuple[str, ...] = ()
    """``--save_additional_columns`` (kept in the per-sample parquet and json)."""
    processes: int = 1
    """``--processes_count``."""
    threads: int = 16
    """``--thread_count``."""
    timeout: int = 10
    """``--timeout`` in seconds per request."""
    retries: int = 0
    """``--retries`` per URL."""
    allow_hosts: tuple[str, ...] = ()
    """The spec's ``allow_hosts``: non-public hosts the egress guard lets img2dataset connect to."""
    max_image_pixels: int | None = None
    """The spec's ``filters.max_image_pixels``: OpenCV refuses to decode images over twice this
    (``OPENCV_IO_MAX_IMAGE_PIXELS``, a decompression-bomb guard); smaller ones are filtered later."""
    egress_guard: bool = True
    """Run img2dataset with the egress guard (``tasks/data/egress_guard``): resolved addresses and redirects
    are checked at connect time."""


@dataclass(frozen=True)
class ShardStats:
    """One shard's ``_stats.json``, checked."""

    shard_id: int
    """img2dataset shard id."""
    count: int
    """Rows given to the shard."""
    successes: int
    """Images written to the tar."""
    failed_to_download: int
    """Rows whose download failed."""
    failed_to_resize: int
    """Rows whose bytes did not decode or resize."""
    status: dict[str, int]
    """Count per status message (``success`` or the error text)."""


def find_img2dataset() -> Path:
    """The img2dataset executable: ``$MVLM_IMG2DATASET`` or ``<repo>/.venv-img2dataset/bin/img2dataset``."""
    configured = os.environ.get(ENV_VAR)
    path = Path(configured) if configured else DEFAULT_EXECUTABLE
    if not (path.is_file() and os.access(path, os.X_OK)):
        where = f"{ENV_VAR}={configured}" if configured else str(path)
        raise Img2DatasetNotFound(
            f"img2dataset not found ({where}); it lives in its own virtual environment: run "
            f"`make {MAKE_TARGET}` (part of `make setup`) or point {ENV_VAR} at an img2dataset executable"
        )
    return path


def shard_name(shard_id: int) -> str:
    """img2dataset's file stem for a shard id (``00003``)."""
    return f"{shard_id:0{OOM_SHARD_COUNT}d}"


def command(executable: Path, url_list: Path, output: Path, opts: DownloadOptions) -> list[str]:
    """The img2dataset command line for one download."""
    args = {
        "url_list": str(url_list),
        "output_folder": str(output),
        "output_format": "webdataset",
        "input_format": opts.input_format,
        "url_col": opts.url_col,
        "caption_col": opts.caption_col,
        "image_size": opts.image_size,
        "resize_mode": opts.resize_mode,
        "processes_count": opts.processes,
        "thread_count": opts.threads,
        "number_sample_per_shard": opts.shard_samples,
        "enable_wandb": False,
        "timeout": opts.timeout,
        "retries": opts.retries,
        "incremental_mode": "incremental",
        "oom_shard_count": OOM_SHARD_COUNT,
        "distributor": "multiprocessing",
        # img2dataset only downloads: the bytes are kept as sent and every check, conversion and
        # resize happens in our second pass (tasks.data.image_checks.normalise_image), as on every route.
        "disable_all_reencoding": True,
    }
    cmd = [str(executable)]
    for name, value in args.items():
        cmd += [f"--{name}", str(value)]
    if opts.additional_columns:
        cmd += ["--save_additional_columns", json.dumps(list(opts.additional_columns))]
    return cmd


def _child_env(opts: DownloadOptions) -> dict[str, str]:
    """Our environment minus anything that would leak our venv into img2dataset's, quiet and offline;
    with the egress guard on, ``PYTHONPATH`` is the guard's folder (its ``sitecustomize`` loads it)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env = {k: v for k, v in env.items() if not k.startswith("MVLM_EGRESS_")}
    if opts.max_image_pixels:
        env["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(2 * opts.max_image_pixels)
    if opts.egress_guard:
        env.update(
            PYTHONPATH=str(GUARD_DIR), MVLM_EGRESS_GUARD="1", MVLM_EGRESS_ALLOW=json.dumps(opts.allow_hosts)
        )
    no_proxy = ",".join(filter(None, [env.get("NO_PROXY", ""), "127.0.0.1,localhost,::1"]))
    env.update(
        NO_ALBUMENTATIONS_UPDATE="1",
        WANDB_MODE="disabled",
        WANDB_SILENT="true",
        PYTHONUNBUFFERED="1",
        NO_PROXY=no_proxy,
        no_proxy=no_proxy,
    )
    return env


def run_img2dataset(url_list: Path, output: Path, opts: DownloadOptions, label: str = "img2dataset") -> None:
    """Run img2dataset on ``url_list`` into ``output``, streaming its log; raise on a non-zero exit."""
    cmd = command(find_img2dataset(), url_list, output, opts)
    log.debug("%s: running %s", label, " ".join(cmd))
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=_child_env(opts),
        text=True,
        errors="replace",
    )
    guarded = False
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            for line in raw.replace("\r", "\n").splitlines():
                if line.strip():
                    guarded = guarded or line.startswith(GUARD_BANNER)
                    tail.append(line)
                    tool_log.info("%s: %s", label, line.rstrip())
        code = proc.wait()
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if code != 0:
        raise Img2DatasetError(
            f"{label}: img2dataset exited with status {code}; last lines:\n" + "\n".join(tail)
        )
    if opts.egress_guard and not guarded:
        raise Img2DatasetError(
            f"{label}: the egress guard did not announce itself in img2dataset's log (is another "
            f"sitecustomize shadowing {GUARD_DIR / 'sitecustomize.py'}?); its downloads are not trusted"
        )


def read_stats(output: Path, shard_id: int, expected_count: int | None = None) -> ShardStats:
    """Read and check one shard's stats: successes + failures == count (== expected), statuses add up."""
    path = output / f"{shard_name(shard_id)}_stats.json"
    if not path.is_file():
        raise Img2DatasetError(
            f"img2dataset did not finish shard {shard_id} (no {path.name} in {output}); see its log above"
        )
    data = json.loads(path.read_text())
    stats = ShardStats(
        shard_id=shard_id,
        count=int(data["count"]),
        successes=int(data["successes"]),
        failed_to_download=int(data["failed_to_download"]),
        failed_to_resize=int(data["failed_to_resize"]),
        status={str(k): int(v) for k, v in data.get("status_dict", {}).items()},
    )
    problems = []
    if stats.successes + stats.failed_to_download + stats.failed_to_resize != stats.count:
        problems.append("successes + failed_to_download + failed_to_resize != count")
    if expected_count is not None and stats.count != expected_count:
        problems.append(f"count {stats.count} != {expected_count} rows given to the shard")
    if sum(stats.status.values()) != stats.count:
        problems.append(f"status_dict adds up to {sum(stats.status.values())}, not count")
    if stats.status.get("success", 0) != stats.successes:
        problems.append("status_dict['success'] != successes")
    if problems:
        raise Img2DatasetError(f"{path}: inconsistent stats ({'; '.join(problems)}): {data}")
    return stats


def read_status_rows(output: Path, shard_id: int) -> list[dict[str, Any]]:
    """The per-sample rows of a shard (key, status, error_message, sizes, saved columns), sorted by key."""
    import pyarrow.parquet as pq

    path = output / f"{shard_name(shard_id)}.parquet"
    columns = [c for c in pq.read_schema(path).names if c != "exif"]
    rows = pq.read_table(path, columns=columns).to_pylist()
    return sorted(rows, key=lambda r: r["key"])


def failure_reason(status: str, message: str | None) -> str:
    """A reject reason for a failed img2dataset row: http_404, http_error, timeout, decode_error, ..."""
    text = (message or "").strip()
    lower = text.lower()
    if status == "failed_to_download":
        if "mvlm egress guard" in lower:
            return "egress_refused"
        if match := _HTTP_ERROR.search(text):
            return "http_404" if match.group(1) == "404" else "http_error"
        if "timed out" in lower or "timeout" in lower:
            return "timeout"
        if "x-robots-tag" in lower:
            return "disallowed_by_robots"
        if "hash mismatch" in lower:
            return "hash_mismatch"
        if "urlopen error" in lower or "connection" in lower or "remote end closed" in lower:
            return "connection_error"
        return "download_error"
    if status == "failed_to_resize":
        if text in _FILTER_MESSAGES:
            return _FILTER_MESSAGES[text]
        if "cv_io_max_image_pixels" in lower:  # refused before decoding (decompression-bomb guard)
            return "image_too_large"
        if "decod" in lower or "imdecode" in lower or "buf.empty" in lower:
            return "decode_error"
        return "resize_error"
    return "download_error"


def shard_files(output: Path, shard_id: int) -> list[Path]:
    """The three files img2dataset writes for a shard."""
    stem = shard_name(shard_id)
    return [output / f"{stem}.tar", output / f"{stem}.parquet", output / f"{stem}_stats.json"]


def forget_shard(output: Path, shard_id: int) -> None:
    """Delete a shard's files so ``--incremental_mode incremental`` downloads it again."""
    for path in reversed(shard_files(output, shard_id)):  # stats first: it marks the shard done
        path.unlink(missing_ok=True)
