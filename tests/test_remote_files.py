"""Remote text files, RedPajama v1's way: a urls.txt of jsonl / jsonl.gz / jsonl.zst files with sha256
files beside them, served by a loopback HTTP server that can drop a connection mid-file."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard
from remote_server import ServerState, serve

from tasks.data.remote_files import FetchError, RemoteMissing, describe, fetch
from tasks.data.url_policy import HostPolicy

LOOPBACK = HostPolicy.from_allow(["127.0.0.1"])
RELEASE = "redpajama-data-1T/v1.0.0"
FILES = {  # path under the release -> (compression, with a .sha256 beside it)
    "arxiv/arxiv_0a.jsonl": ("", True),
    "arxiv/arxiv_1b.jsonl.gz": ("gz", True),
    "book/book.jsonl": ("", False),  # no checksum published: ETag and size identify it
    "common_crawl/2023-06/en_head_0000.json.gz.dedup.classifier.jsonl.zst": ("zst", True),
    "wikipedia/wiki.jsonl": ("", True),
}
MISSING = "wikipedia/wiki_gone.jsonl"  # listed, but the server answers 404
SUBSETS = ("arxiv", "book", "common_crawl", "wikipedia")
SPEC = """\
name: {name}
kind: text
profile: tiny
license: CC0-1.0
tokenizer: {tokenizer}
seq_len: 32
shard_samples: 16
heldout_fraction: 0.1
max_failure_ratio: 0.2
allow_hosts: [127.0.0.1]
subsets:
{subsets}
"""


def _docs(path: str) -> bytes:
    lines = [json.dumps({"text": f"Document {i} of {path}: a fox runs by the river number {i}. " * 3})
             for i in range(30)]  # fmt: skip
    return ("\n".join(lines) + "\n").encode()


def _compress(data: bytes, kind: str) -> bytes:
    if kind == "gz":
        return gzip.compress(data, mtime=0)
    if kind == "zst":
        return zstandard.ZstdCompressor().compress(data)
    return data


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, ServerState, Path]]:
    root = tmp_path_factory.mktemp("remote")
    release = root / RELEASE
    for rel, (kind, with_sha) in FILES.items():
        path = release / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_compress(_docs(rel), kind))
        if with_sha:
            Path(f"{path}.sha256").write_text(
                f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n"
            )
    bad = release / "bad" / "bad.jsonl"
    bad.parent.mkdir()
    bad.write_bytes(_docs("bad"))
    Path(f"{bad}.sha256").write_text("0" * 64 + "\n")
    with serve(root) as (base, state):
        urls = [f"{base}/{RELEASE}/{rel}" for rel in [*FILES, MISSING]]
        (release / "urls.txt").write_text("\n".join(urls) + "\n")
        yield base, state, root


def test_a_dropped_download_resumes_with_a_range_request(server, tmp_path: Path) -> None:
    base, state, root = server
    rel = f"/{RELEASE}/arxiv/arxiv_0a.jsonl"
    remote = describe(base + rel, LOOPBACK)
    data = (root / rel.lstrip("/")).read_bytes()
    assert remote.sha256 == hashlib.sha256(data).hexdigest() and remote.size == len(data) and remote.etag
    state.drop_after[rel] = 1000
    local = fetch(remote, tmp_path, LOOPBACK, retries=2, backoff_s=0.01)
    assert local.read_bytes() == data
    assert ("GET", rel, "bytes=1000-") in state.requests  # resumed where the cut left it
    again = len(state.requests)
    assert fetch(remote, tmp_path, LOOPBACK) == local and len(state.requests) == again  # reused, verified


def test_a_wrong_checksum_fails_naming_the_file_and_keeps_nothing(server, tmp_path: Path) -> None:
    base, _, _ = server
    url = f"{base}/{RELEASE}/bad/bad.jsonl"
    with pytest.raises(FetchError, match=r"bad\.jsonl: the download's sha256 is [0-9a-f]{64}, the publisher"):
        fetch(describe(url, LOOPBACK), tmp_path, LOOPBACK, retries=0)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_missing_files_and_refused_hosts(server, tmp_path: Path) -> None:
    base, _, _ = server
    with pytest.raises(RemoteMissing, match="HTTP 404"):
        fetch(describe(f"{base}/{RELEASE}/{MISSING}", LOOPBACK), tmp_path, LOOPBACK, retries=0)
    with pytest.raises(FetchError, match="private address"):
        describe("http://10.0.0.7/urls.txt", LOOPBACK)
    with pytest.raises(FetchError, match="loopback address"):  # 127.0.0.1 only when allow_hosts says so
        describe(f"{base}/{RELEASE}/urls.txt", HostPolicy())


def _spec(name: str, tokenizer: Path, sources: list[str]) -> str:
    subsets = "\n".join(
        f"  - {{name: {sub}, source: {src}}}" for sub, src in zip(SUBSETS, sources, strict=True)
    )
    return SPEC.format(name=name, tokenizer=tokenizer, subsets=subsets)


@pytest.mark.slow
def test_mvlm_data_build_fetches_resumes_and_equals_the_local_build(
    server, samples_root: Path, tmp_path: Path, ray_local: None
) -> None:
    """The CLI as a user runs it, with Prefect's analytics setting unset: shards equal a build of the
    same files from disk, the cut download is resumed, the 404 is counted, no ERROR line is printed."""
    from tasks.data.build import build_dataset

    base, state, root = server
    tokenizer = samples_root / "samples" / "tokenizer"
    specs = tmp_path / "specs"
    specs.mkdir()
    remote = [
        f"{{type: remote_files, listing: {base}/{RELEASE}/urls.txt, include: /{sub}/}}" for sub in SUBSETS
    ]
    (specs / "remote-rp.yaml").write_text(_spec("remote-rp", tokenizer, remote))
    local = []
    for sub in SUBSETS:
        paths = [str(root / RELEASE / rel) for rel in FILES if rel.startswith(sub + "/")]
        local.append(f"{{type: files, paths: {json.dumps(paths)}}}")
    (specs / "local-rp.yaml").write_text(_spec("local-rp", tokenizer, local))

    cut = f"/{RELEASE}/common_crawl/2023-06/en_head_0000.json.gz.dedup.classifier.jsonl.zst"
    half = (root / cut.lstrip("/")).stat().st_size // 2
    state.drop_after[cut] = half
    data_root = tmp_path / "data"
    env = {**os.environ, "MVLM_SPEC_DIR": str(specs), "MVLM_NO_PROGRESS": "1", "COLUMNS": "200",
           "PREFECT_HOME": str(tmp_path / "prefect"), "MVLM_WORK_DIR": str(tmp_path / "work")}  # fmt: skip
    for key in ("PREFECT_API_URL", "RAY_ADDRESS", "PREFECT_SERVER_ANALYTICS_ENABLED"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "flows.cli", "data", "build", "remote-rp", "--data-root", str(data_root)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "ERROR" not in output and "telemetry" not in output.lower(), output[-4000:]
    assert ("GET", cut, f"bytes={half}-") in state.requests

    (manifest_path,) = data_root.glob("builds/remote-rp/*/manifest.json")
    manifest = json.loads(manifest_path.read_text())
    assert manifest["stats"]["rejects"] == {"http_404": 1}
    files = {f["url"].split(RELEASE + "/")[1]: f for s in manifest["source"].values() for f in s["files"]}
    assert files["arxiv/arxiv_1b.jsonl.gz"]["sha256"] and files["book/book.jsonl"]["sha256"] is None
    assert files["book/book.jsonl"]["etag"] and files["book/book.jsonl"]["size"] > 0
    reference = build_dataset(specs / "local-rp.yaml", tmp_path / "local-data")
    assert reference.manifest["stats"]["totals"]["documents"] == 5 * 30
    shards = {r["path"]: r["sha256"] for r in manifest["shards"]}
    assert shards == {r["path"]: r["sha256"] for r in reference.manifest["shards"]}


PRETRAIN_SPEC = """\
name: {name}
kind: image_text
profile: tiny
license: CC0-1.0
image_size: 32
shard_samples: 50
allow_hosts: [127.0.0.1]
downloads:
  - {{url: "{base}/llava/blip_tiny.json", to: sources/LLaVA-Pretrain/blip_tiny.json}}
  - {{url: "{base}/llava/{archive}", to: sources/LLaVA-Pretrain/images, unpack: {unpack}}}
subsets:
  - {{name: blip, source: {{type: llava_json, path: sources/LLaVA-Pretrain/blip_tiny.json,
                             image_root: sources/LLaVA-Pretrain/images}}}}
"""


def _archives(folder: Path) -> None:
    """LLaVA-Pretrain's layout in small: a json and images.zip holding 00000/*.jpg; a zip that writes
    outside its folder and a tar holding a symbolic link."""
    import io
    import tarfile
    import zipfile

    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    with zipfile.ZipFile(folder / "images.zip", "w") as zf:
        for i in range(6):
            buffer = io.BytesIO()
            Image.new("RGB", (40, 40), (40 * i, 90, 200)).save(buffer, format="JPEG", quality=95)
            zf.writestr(f"00000/{i:09d}.jpg", buffer.getvalue())
            turns = [
                {"from": "human", "value": "<image>\nDescribe."},
                {"from": "gpt", "value": f"a tile {i}"},
            ]
            entries.append({"id": f"{i:09d}", "image": f"00000/{i:09d}.jpg", "conversations": turns})
    (folder / "blip_tiny.json").write_text(json.dumps(entries))
    with zipfile.ZipFile(folder / "evil.zip", "w") as zf:
        zf.writestr("00000/ok.jpg", b"x")
        zf.writestr("../../escaped.txt", b"outside")
    with tarfile.open(folder / "links.tar.gz", "w:gz") as tf:
        link = tarfile.TarInfo("00000/passwd.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)


def test_spec_downloads_fetch_and_unpack_before_the_build(server, tmp_path: Path, ray_local: None) -> None:
    from tasks.data.build import BuildError, build_dataset

    base, state, root = server
    _archives(root / "llava")
    specs, data_root = tmp_path / "specs", tmp_path / "data"
    specs.mkdir()
    for name, archive, unpack in (("dl-good", "images.zip", "zip"), ("dl-evil", "evil.zip", "zip"),
                                  ("dl-links", "links.tar.gz", "tar")):  # fmt: skip
        text = PRETRAIN_SPEC.format(name=name, base=base, archive=archive, unpack=unpack)
        (specs / f"{name}.yaml").write_text(text)
    result = build_dataset(specs / "dl-good.yaml", data_root)
    assert result.manifest["stats"]["totals"]["kept"] == 6
    assert len(list((data_root / "sources/LLaVA-Pretrain/images/00000").glob("*.jpg"))) == 6
    before = len(state.requests)
    assert build_dataset(specs / "dl-good.yaml", data_root).reused
    assert len(state.requests) == before  # the finished downloads were verified by marker, not fetched
    with pytest.raises(
        BuildError, match=r"downloads\[1\].*member '\.\./\.\./escaped\.txt' would be written outside"
    ):
        build_dataset(specs / "dl-evil.yaml", tmp_path / "data-evil")
    assert not list(tmp_path.rglob("escaped.txt"))
    with pytest.raises(BuildError, match=r"member '00000/passwd\.jpg' is a link or device; archive refused"):
        build_dataset(specs / "dl-links.yaml", tmp_path / "data-links")


def test_build_runs_record_source_commits_and_file_lists_for_lineage(tmp_path: Path) -> None:
    from tasks.lineage import tracking
    from tasks.lineage.publish import log_build

    source = {
        "web": {"dataset": "user/tiny-web", "revision": "main", "config": None, "sha": "b" * 40},
        "arxiv": {"list_sha256": "c" * 64, "files": [{"url": "u1"}, {"url": "u2"}]},
    }
    build = tmp_path / "build"
    (build / "shards").mkdir(parents=True)
    (build / "manifest.json").write_text(json.dumps({"source": source}))
    mlflow = tracking.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent, _ = tracking.run_for(mlflow, tracking.EXPERIMENT, "retrain/lineage", "retrain lineage")
    summary = {
        "name": "mixed",
        "build_id": "0123abcd",
        "path": str(build),
        "kind": "text",
        "totals": {"read": 1},
    }
    params = mlflow.get_run(log_build(mlflow, summary, parent)).data.params
    assert params["source.web.commit"] == "user/tiny-web@" + "b" * 40
    assert params["source.arxiv.files"] == "2" and params["source.arxiv.list_sha256"] == "c" * 64


def test_a_unit_with_a_wrong_checksum_fails_the_build_naming_the_file(
    server, samples_root: Path, tmp_path: Path, ray_local: None
) -> None:
    from tasks.data.build import BuildError, build_dataset

    base, _, _ = server
    specs = tmp_path / "specs"
    specs.mkdir()
    urls = [f"{base}/{RELEASE}/arxiv/arxiv_0a.jsonl", f"{base}/{RELEASE}/bad/bad.jsonl"]
    sources = [f"{{type: remote_files, urls: {json.dumps(urls)}}}"]
    text = _spec("remote-bad", samples_root / "samples" / "tokenizer", sources * 4).replace(
        "name: book", "name: b2"
    )
    (specs / "remote-bad.yaml").write_text(text.split("  - {name: b2")[0])
    with pytest.raises(BuildError, match=r"subset arxiv: .*bad\.jsonl: the download's sha256 is"):
        build_dataset(specs / "remote-bad.yaml", tmp_path / "data")
    cached = [p.name for p in (tmp_path / "data" / "cache").rglob("*") if p.is_file()]
    assert not [n for n in cached if n.startswith("bad.jsonl")], cached  # nothing kept from the bad file
    assert not list((tmp_path / "data" / "builds").rglob("manifest.json"))
