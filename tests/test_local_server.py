"""Tests of the loopback sample server (tasks/data/local_server.py)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from tasks.data.local_server import LOCAL_SERVER_PLACEHOLDER, serve_directory, substitute_server
from tasks.testkit.sample_tree import make_samples
from tasks.testkit.samples import SampleConfig

# Ignore any proxy settings of the environment: requests must go straight to the loopback server.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str) -> bytes:
    """Body of a GET request (HTTPError for non-2xx)."""
    with _OPENER.open(url, timeout=10) as response:
        return response.read()


def test_serves_files_byte_exact(tmp_path: Path) -> None:
    data = os.urandom(70_000)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "blob.bin").write_bytes(data)
    with serve_directory(tmp_path) as url:
        assert url.startswith("http://127.0.0.1:")
        assert _get(f"{url}/sub/blob.bin") == data


def test_missing_file_is_404_and_quiet(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    with serve_directory(tmp_path) as url:
        with pytest.raises(urllib.error.HTTPError) as err:
            _get(f"{url}/nope.jpg")
        assert err.value.code == 404
    assert capfd.readouterr().err == ""  # request logs go to logging, not stderr


def test_request_log_goes_to_logging(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "a.txt").write_text("a")
    with (
        caplog.at_level(logging.DEBUG, logger="tasks.data.local_server"),
        serve_directory(tmp_path) as url,
    ):
        _get(f"{url}/a.txt")
    assert any("GET /a.txt" in r.getMessage() for r in caplog.records)


def test_stops_on_exit(tmp_path: Path) -> None:
    with serve_directory(tmp_path) as url:
        pass
    with pytest.raises(urllib.error.URLError):
        _get(f"{url}/")


def test_localhost_name_is_allowed(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(b"x")
    with serve_directory(tmp_path, host="localhost") as url:
        assert _get(f"{url}/x") == b"x"


def test_ipv6_loopback(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(b"x")
    stack = contextlib.ExitStack()
    try:
        url = stack.enter_context(serve_directory(tmp_path, host="::1"))
    except OSError as err:  # no IPv6 on this machine
        pytest.skip(f"IPv6 loopback unavailable: {err}")
    with stack:
        assert url.startswith("http://[::1]:")
        assert _get(f"{url}/x") == b"x"


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "8.8.8.8", "::", "example.com", ""])
def test_refuses_non_loopback_hosts(tmp_path: Path, host: str) -> None:
    with pytest.raises(ValueError, match="loopback"), serve_directory(tmp_path, host=host):
        pass


def test_missing_root_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError), serve_directory(tmp_path / "absent"):
        pass


def test_substitute_server() -> None:
    text = f"url\tcaption\n{LOCAL_SERVER_PLACEHOLDER}/images/000000.jpg\ta red circle\n"
    out = substitute_server(text, "http://127.0.0.1:8000/")
    assert out == "url\tcaption\nhttp://127.0.0.1:8000/images/000000.jpg\ta red circle\n"
    assert substitute_server("no placeholder", "http://127.0.0.1:1") == "no placeholder"


def test_serves_the_sample_url_list(tmp_path: Path) -> None:
    summary = make_samples(tmp_path, SampleConfig(n_images=12, n_docs_per_subset=4, n_chats=4))
    status = {"good": 0, "missing": 0, "corrupt": 0}
    with serve_directory(tmp_path) as url:
        rows = substitute_server((tmp_path / "cc3m" / "urls.tsv").read_text(), url).splitlines()[1:]
        for row in rows:
            address = row.split("\t")[0]
            try:
                body = _get(address)
            except urllib.error.HTTPError as err:
                assert err.code == 404
                status["missing"] += 1
                continue
            assert body == (tmp_path / address.removeprefix(f"{url}/")).read_bytes()
            try:
                Image.open(io.BytesIO(body)).load()
                status["good"] += 1
            except OSError:
                status["corrupt"] += 1
    assert status == {
        "good": summary.cc3m.good + summary.cc3m.planted,  # the planted copies are served too
        "missing": summary.cc3m.missing,
        "corrupt": summary.cc3m.corrupt,
    }
