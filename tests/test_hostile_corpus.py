"""The hostile-input corpus (``tests/hostile_corpus.py``) through the real builds, case by case.

Every dataset of the corpus is built with ``tasks.data.build.build_dataset`` (real builders, local Ray,
img2dataset in its own venv against the loopback server for the URL list); each case's fate is
asserted on its own: a kept case is in the shards with the right content, a rejected one is in
``rejects.jsonl`` at its place with its reason, a whole-file case fails its build with a message
naming the file. Also here: bounded reads (a 50 MB line with bounded memory), the egress guard
(resolved addresses and redirects checked inside img2dataset) and the docs table.
"""

from __future__ import annotations

import io
import json
import os
import re
import threading
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from hostile_corpus import KEPT, SOURCES, Case, cases, datasets, markdown_table, write_corpus
from PIL import Image

from model.tokenizer import load_tokenizer
from tasks.data.bounded_read import bounded_lines
from tasks.data.build import BuildResult, build_dataset
from tasks.data.builder import BuildContext, Unit
from tasks.data.shard_read import read_tar_samples
from tasks.data.specs import parse_spec

CASES = cases()
DOC = Path(__file__).resolve().parent.parent / "docs" / "untrusted-inputs.md"
TABLE_START, TABLE_END = "<!-- corpus-table:start -->", "<!-- corpus-table:end -->"


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    root = tmp_path_factory.mktemp("hostile_corpus")
    assert write_corpus(root) == CASES
    tiny_tokenizer.save_pretrained(root / "tok")
    return root


@pytest.fixture(scope="module")
def built(corpus_root: Path, ray_local: None) -> Iterator[Callable[[str], BuildResult | Exception]]:
    """``built(name)``: the build of a corpus dataset (built once, on first use), or its exception."""
    results: dict[str, BuildResult | Exception] = {}

    def get(name: str) -> BuildResult | Exception:
        if name not in results:
            try:
                results[name] = build_dataset(corpus_root / "specs" / f"{name}.yaml", corpus_root)
            except Exception as err:  # whole-file cases: the fate is the error
                results[name] = err
        return results[name]

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MVLM_IMG2DATASET_PROCESSES", "1")
        yield get


def _result(built: Callable[[str], BuildResult | Exception], name: str) -> BuildResult:
    result = built(name)
    if isinstance(result, Exception):
        raise AssertionError(f"build of {name} failed: {result}") from result
    return result


def _rejects(result: BuildResult) -> dict[str, dict[str, str]]:
    rows = [json.loads(line) for line in (result.path / "rejects.jsonl").read_text().splitlines()]
    by_where = {row["where"]: row for row in rows}
    assert len(by_where) == len(rows), "two rejects at one place"
    return by_where


def _samples(result: BuildResult) -> list[dict[str, bytes]]:
    shards = sorted(result.manifest["shards"], key=lambda rec: rec["path"])
    return [s for rec in shards for s in read_tar_samples(result.path / rec["path"])]


def _centre(jpg: bytes) -> tuple[int, int, int]:
    with Image.open(io.BytesIO(jpg)) as image:
        assert (image.format, image.mode) == ("JPEG", "RGB")
        return image.getpixel((image.width // 2, image.height // 2))


def _close(colour: tuple[int, int, int], expected: tuple[int, int, int], tol: int = 8) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(colour, expected, strict=True))


# --- kept cases: their content in the shards ------------------------------------------------------


def _text_docs(result: BuildResult, corpus_root: Path) -> list[list[int]]:
    """The packed documents of the text build, in order (the last one may lack its dropped tail)."""
    stream: list[int] = []
    starts: list[int] = []
    for sample in sorted(_samples(result), key=lambda s: s["__key__"]):
        ids = np.load(io.BytesIO(sample["input_ids.npy"])).ravel().tolist()
        starts += [len(stream) + s for s in np.load(io.BytesIO(sample["doc_starts.npy"])).tolist()]
        stream += ids
    return [stream[a:b] for a, b in zip(starts, [*starts[1:], len(stream)], strict=True)]


def _check_kept(case: Case, result: BuildResult, corpus_root: Path) -> None:
    if case.kind == "text":
        tok = load_tokenizer(corpus_root / "tok")
        kept = [c for c in CASES if c.dataset == case.dataset and c.fate == KEPT]
        position = kept.index(case)
        docs = _text_docs(result, corpus_root)
        assert len(docs) == len(kept)
        expected = [*tok(case.expect, add_special_tokens=False)["input_ids"], tok.eos_token_id]
        got = docs[position]
        if position == len(kept) - 1:  # the tail that did not fill a sequence is dropped (and counted)
            assert got == expected[: len(got)] and len(got) > 0
        else:
            assert got == expected
        return
    samples = _samples(result)
    if case.dataset.startswith(("hc-chat", "hc-instruct")):
        index = int(case.where.split()[1])
        sample = next(s for s in samples if s["__key__"] == f"main-{index:08d}")
        meta = json.loads(sample["json"])
        assert meta["conversations"] == case.expect["conversations"]
        assert meta["id"] == str(case.payload.get("id", sample["__key__"]))
        assert ("jpg" in sample) == case.expect["image"]
        if case.expect["image"]:
            with Image.open(io.BytesIO(sample["jpg"])) as image:
                assert min(image.size) <= 64
            assert _close(_centre(sample["jpg"]), case.expect["colour"]), _centre(sample["jpg"])
        return
    if case.dataset == "hc-pretrain":
        sample = next(s for s in samples if s["__key__"] == case.expect["key"])
    else:
        sample = next(s for s in samples if json.loads(s["json"])["row"] == case.expect["row"])
        assert json.loads(sample["json"])["url"] == case.payload.decode().split("\t")[0]
    assert sample["txt"].decode() == case.expect["caption"]
    with Image.open(io.BytesIO(sample["jpg"])) as image:
        assert min(image.size) == 32  # keep_ratio: the smaller side becomes image_size
    if case.expect["colour"] is not None:
        assert _close(_centre(sample["jpg"]), case.expect["colour"]), _centre(sample["jpg"])


def _param(case: Case) -> object:
    marks = [pytest.mark.xfail(reason=case.known_bug, strict=True)] if case.known_bug else []
    return pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_case_fate(case: Case, built: Callable[[str], BuildResult | Exception], corpus_root: Path) -> None:
    result = built(case.dataset)
    if isinstance(case.fate, tuple) and case.fate[0] == "build_error":
        assert isinstance(result, Exception), f"{case.dataset} built, but should have failed"
        message = str(result)
        assert case.fate[1] in message and SOURCES[case.dataset] in message, message[-2000:]
        return
    assert not isinstance(result, Exception), f"build of {case.dataset} failed: {result}"
    rejects = _rejects(result)
    if case.fate == KEPT:
        assert case.where not in rejects, f"expected kept, rejected as {rejects.get(case.where)}"
        _check_kept(case, result, corpus_root)
        return
    assert case.where in rejects, f"no reject at {case.where}; rejects: {sorted(rejects)}"
    row = rejects[case.where]
    assert row["reason"] == case.fate[1], row
    assert row["detail"], "a reject must say why"
    if isinstance(case.expect, dict) and "detail" in case.expect:
        assert case.expect["detail"] in row["detail"], row["detail"]


def _built_params() -> list[object]:
    params = []
    for name in datasets(CASES):
        mine = [c for c in CASES if c.dataset == name]
        if all(c.fate == KEPT or c.fate[0] == "rejected" for c in mine):
            bugs = {c.known_bug for c in mine if c.known_bug}
            marks = [pytest.mark.xfail(reason=bugs.pop(), strict=True)] if bugs else []
            params.append(pytest.param(name, id=name, marks=marks))
    return params


@pytest.mark.parametrize("name", _built_params())
def test_counts_match_the_cases(name: str, built: Callable[[str], BuildResult | Exception]) -> None:
    result = _result(built, name)
    mine = [c for c in CASES if c.dataset == name]
    expected = Counter(c.fate[1] for c in mine if c.fate != KEPT)
    stats = result.manifest["stats"]
    assert stats["rejects"] == dict(sorted(expected.items()))
    kept = sum(c.fate == KEPT for c in mine)
    totals = stats["totals"]
    assert (totals["read"], totals["kept"], totals["rejected"]) == (len(mine), kept, len(mine) - kept)
    assert len(_rejects(result)) == len(mine) - kept
    assert {row["where"] for row in _rejects(result).values()} == {c.where for c in mine if c.fate != KEPT}
    if name != "hc-text":
        assert sum(rec["samples"] for rec in result.manifest["shards"]) == kept


# --- bounded reads -------------------------------------------------------------------------------

TEXT_SPEC = """\
name: bounded
kind: text
license: CC0-1.0
tokenizer: tok
seq_len: 16
filters: {min_chars: 5, max_chars: 2000}
subsets:
  - {name: web, source: {type: files, paths: [big.jsonl]}}
"""


def _write_big(path: Path, first: bytes, size: int, last: bytes) -> None:
    block = b"q" * (1 << 20)
    with open(path, "wb") as handle:
        handle.write(first + b"\n" + b'{"text": "')
        for _ in range(size >> 20):
            handle.write(block)
        handle.write(b'"}\n' + last + b"\n")


def test_a_50mb_line_is_rejected_with_bounded_memory(tmp_path: Path) -> None:
    from tasks.data.text_sources import read_docs

    spec = parse_spec(TEXT_SPEC)
    path = tmp_path / "big.jsonl"
    good = [json.dumps({"text": f"Good document number {i} follows."}).encode() for i in range(3)]
    _write_big(path, good[0], 50 << 20, b"\n".join(good[1:]))
    ctx = BuildContext(spec, "bounded.yaml", str(tmp_path), "x", str(tmp_path / "out"), None, None)
    tracemalloc.start()
    try:
        docs = list(read_docs(Unit(0, "web", str(path)), ctx))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"peak {peak / 2**20:.1f} MiB while reading a 50 MB line"
    assert [(d.where, d.reason) for d in docs if d.text is None] == [("line 2", "oversized_line")]
    assert "52428812 bytes > 1072576 bytes" in docs[1].detail and "max_line_bytes" in docs[1].detail
    assert [d.text for d in docs if d.text is not None] == [
        f"Good document number {i} follows." for i in range(3)
    ]


def test_a_50mb_tsv_row_is_rejected_with_bounded_memory(tmp_path: Path) -> None:
    from tasks.data.specs import UrlListSource
    from tasks.data.url_rows import read_url_list

    path = tmp_path / "urls.tsv"
    with open(path, "wb") as handle:
        handle.write(b"url\tcaption\nhttp://example.com/a.jpg\tfirst\nhttp://example.com/big.jpg\t")
        for _ in range(50):
            handle.write(b"w" * (1 << 20))
        handle.write(b"\nhttp://example.com/b.jpg\tlast\n")
    src = UrlListSource(type="url_list", path=str(path))
    tracemalloc.start()
    try:
        rows = read_url_list(str(path), src)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"peak {peak / 2**20:.1f} MiB while reading a 50 MB row"
    assert [(r.where, r.url, r.caption) for r in rows if not r.problem] == [
        ("row 0", "http://example.com/a.jpg", "first"),
        ("row 1", "http://example.com/b.jpg", "last"),
    ]
    assert [(r.where, r.reason) for r in rows if r.problem] == [("line 3", "oversized_line")]


@pytest.mark.parametrize(
    ("data", "limit", "expected"),
    [
        (b"abcd\nabcde\n", 4, [b"abcd", None]),
        (b"abcd\r\nabcd", 4, [b"abcd", b"abcd"]),  # CRLF does not count; no newline at the end
        (b"abcde", 4, [None]),
        (b"abcdef\r\nxy\n\nz", 4, [None, b"xy", b"", b"z"]),
        (b"\xef\xbb\xbfabcd\n", 4, [b"abcd"]),  # a BOM on line 1 is dropped
        (b"x" * 100_000 + b"\nok\n", 10, [None, b"ok"]),
    ],
)
def test_bounded_lines(data: bytes, limit: int, expected: list[bytes | None]) -> None:
    lines = list(bounded_lines(io.BytesIO(data), limit))
    assert [line.data for line in lines] == expected
    assert [line.number for line in lines] == list(range(1, len(expected) + 1))


# --- the egress guard inside img2dataset ------------------------------------------------------------


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(buffer, format="JPEG")
    return buffer.getvalue()


class _Handler(BaseHTTPRequestHandler):
    """``/ok.jpg`` answers an image; ``/redirect?to=URL`` answers 302 to ``URL``."""

    body = _jpeg()

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        from urllib.parse import parse_qs, urlsplit

        if self.path.startswith("/redirect?"):
            self.send_response(302)
            self.send_header("Location", parse_qs(urlsplit(self.path).query)["to"][0])
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)


def _serve(host: str) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, 0), _Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


def test_egress_guard_checks_resolved_addresses_and_redirects(tmp_path: Path) -> None:
    """Allowed: 127.0.0.2 only. A redirect from it to 127.0.0.1, and a name (localhost) that resolves to
    127.0.0.1, both pass a pre-download check that does not resolve names or follow redirects; the
    guard inside img2dataset refuses them at connect time. Without the guard both are downloaded."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.data.img2dataset_runner import (
        DownloadOptions,
        failure_reason,
        read_status_rows,
        run_img2dataset,
    )

    try:
        allowed = _serve("127.0.0.2")
    except OSError as err:
        pytest.skip(f"cannot bind 127.0.0.2 here ({err})")
    internal = _serve("127.0.0.1")
    a, b = allowed.server_address[1], internal.server_address[1]
    to = f"http://127.0.0.2:{a}/redirect?to="
    urls = {
        "allowed": f"http://127.0.0.2:{a}/ok.jpg",
        "redirect_allowed": to + quote(f"http://127.0.0.2:{a}/ok.jpg"),
        "redirect_internal": to + quote(f"http://127.0.0.1:{b}/ok.jpg"),
        "redirect_ftp": to + quote(f"ftp://127.0.0.2:{a}/ok.jpg"),
        "name_resolving_internal": f"http://localhost:{b}/ok.jpg",
    }
    input_path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"url": list(urls.values()), "caption": list(urls)}), input_path)
    outcome, messages = {}, {}
    try:
        for guard in (True, False):
            opts = DownloadOptions(
                image_size=32, resize_mode="keep_ratio", shard_samples=100, processes=1, threads=4, timeout=3,
                allow_hosts=("127.0.0.2",), egress_guard=guard,
            )  # fmt: skip
            out = tmp_path / f"guard-{guard}"
            run_img2dataset(input_path, out, opts)
            rows = read_status_rows(out, 0)
            outcome[guard] = {
                r["caption"]: "ok"
                if r["status"] == "success"
                else failure_reason(r["status"], r["error_message"])
                for r in rows
            }
            messages[guard] = {r["caption"]: r["error_message"] for r in rows}
    finally:
        allowed.shutdown()
        internal.shutdown()
    assert outcome[True] == {
        "allowed": "ok",
        "redirect_allowed": "ok",
        "redirect_internal": "egress_refused",
        "redirect_ftp": "egress_refused",
        "name_resolving_internal": "egress_refused",
    }, messages[True]
    assert "localhost resolves to 127.0.0.1, a loopback address" in messages[True]["name_resolving_internal"]
    assert "127.0.0.1 resolves to 127.0.0.1" in messages[True]["redirect_internal"]
    assert "scheme 'ftp'" in messages[True]["redirect_ftp"]
    # without the guard, img2dataset follows the redirect and connects to what the name resolves to
    assert outcome[False]["redirect_internal"] == "ok" and outcome[False]["name_resolving_internal"] == "ok"
    assert outcome[False]["redirect_ftp"] != "egress_refused"


def test_guard_must_announce_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A download whose egress guard did not load (here: a stand-in img2dataset that ignores it) fails."""
    import tasks.data.img2dataset_runner as runner

    fake = tmp_path / "img2dataset"
    fake.write_text("#!/bin/sh\necho downloading without a guard\n")
    fake.chmod(0o755)
    monkeypatch.setenv("MVLM_IMG2DATASET", str(fake))
    opts = runner.DownloadOptions(image_size=32, resize_mode="keep_ratio", shard_samples=10)
    with pytest.raises(runner.Img2DatasetError, match="egress guard did not announce itself"):
        runner.run_img2dataset(tmp_path / "in.parquet", tmp_path / "out", opts)
    env = runner._child_env(opts)
    assert env["PYTHONPATH"] == str(runner.GUARD_DIR) and json.loads(env["MVLM_EGRESS_ALLOW"]) == []
    assert (runner.GUARD_DIR / "sitecustomize.py").is_file()


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://[::127.0.0.1]/", "loopback"),  # IPv4-compatible
        ("http://[2002:a00:1::]/", "private"),  # 6to4 of 10.0.0.1
        ("http://[64:ff9b::a9fe:a9fe]/", "link-local"),  # NAT64 of 169.254.169.254
        ("http://0177.0.0.1/", "loopback"),  # octal
        ("http://１２７．０．０．１/", "loopback"),  # fullwidth digits and dots
        ("http://[::]/", "unspecified"),
    ],
)
def test_url_policy_sees_through_address_forms(url: str, why: str) -> None:
    from tasks.data.url_policy import HostPolicy, url_problem

    problem = url_problem(url, HostPolicy.from_allow([]))
    assert problem and why in problem, problem
    assert url_problem("https://example.com/a.jpg", HostPolicy.from_allow([])) is None


# --- the docs ------------------------------------------------------------------------------------


def test_docs_table_is_the_corpus_table() -> None:
    text = DOC.read_text()
    assert TABLE_START in text and TABLE_END in text, f"{DOC} lacks the corpus table markers"
    table = text.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0].strip() + "\n"
    assert table == markdown_table(CASES), "regenerate it: .venv/bin/python tests/hostile_corpus.py"
    reasons = {c.fate[1] for c in CASES if c.fate != KEPT and c.fate[0] == "rejected"}
    for reason in sorted(reasons):
        assert re.search(rf"`{reason}`", text), reason
    assert os.path.getsize(DOC) > 0


def test_symlink_loops_and_overlong_names_are_rejects_not_crashes(tmp_path: Path) -> None:
    """What the ``symlink_loop`` case needs from the builders, checked on the functions themselves."""
    from tasks.data.instruct import SampleError, resolve_image
    from tasks.data.llava_images import image_under_root

    root = tmp_path / "img"
    root.mkdir()
    (root / "a.jpg").symlink_to("b.jpg")
    (root / "b.jpg").symlink_to("a.jpg")
    for name in ("a.jpg", "n" * 5000):
        with pytest.raises(SampleError) as err:
            resolve_image(str(root), name)
        assert err.value.reason == "missing_image" and "cannot resolve" in str(err.value)
        assert image_under_root(root.resolve(), name)[:2] == (None, "missing_image")
