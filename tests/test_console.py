"""A quiet console: our messages on screen, library output and tracebacks in the log file."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from flows.logs import ConsoleFilter

REPO = Path(__file__).resolve().parent.parent


def _record(name: str, level: int, exc: bool = False, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord(name, level, __file__, 1, "message", None, None)
    if exc:
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            record.exc_info = sys.exc_info()
    record.__dict__.update(extra)
    return record


def test_the_console_filter_keeps_ours_and_sends_the_rest_to_the_file() -> None:
    keep = ConsoleFilter().filter
    assert keep(_record("tasks.data.build", logging.INFO))
    assert keep(_record("flows.retrain", logging.WARNING))
    assert keep(_record("model.tokenizer", logging.INFO))
    assert not keep(_record("tasks.data.build", logging.DEBUG))
    assert not keep(_record("flows.errors", logging.ERROR, console=False))  # the traceback, for the file
    assert not keep(_record("transformers.configuration_utils", logging.WARNING))
    assert not keep(_record("py.warnings", logging.WARNING))  # torch's FutureWarnings
    assert not keep(_record("ray_workers", logging.WARNING))
    assert not keep(_record("img2dataset", logging.INFO))
    assert not keep(_record("prefect.task_runs", logging.INFO))  # "Finished in state Completed()"
    assert not keep(_record("prefect.task_runs", logging.ERROR, exc=True))  # Prefect's failure traceback
    assert keep(_record("prefect.task_runs", logging.WARNING))  # our tasks' get_run_logger warnings
    assert keep(_record("duckdb", logging.ERROR))  # another library's error still shows


def test_a_user_error_is_one_message_and_the_traceback_is_in_the_log(tmp_path: Path) -> None:
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "mine.yaml").write_text(
        "name: mine\nkind: image_text\nprofile: tiny\nlicense: CC0-1.0\nimage_size: 64\nshard_samples: 16\n"
        "subsets:\n  - {name: a, source: {type: llava_json, path: mine/pretrain.json, image_root: mine}}\n"
    )
    env = {
        **os.environ,
        "MVLM_WORK_DIR": str(tmp_path / "work"),
        "MVLM_SPEC_DIR": str(specs),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "COLUMNS": "200",
    }
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "data", "build", "mine"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "Traceback" not in out and "Encountered exception" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "mine/pretrain.json" in errors[0] and "matched no file" in errors[0], out
    details = [line.removeprefix("details: ") for line in out.splitlines() if line.startswith("details: ")]
    assert len(details) == 1, out
    log_text = Path(details[0]).read_text()
    assert Path(details[0]).parent == tmp_path / "work" / "logs"
    assert "Traceback" in log_text and "matched no file" in log_text
    assert len([line for line in out.splitlines() if line.strip()]) <= 6, out
