"""Image-text builds: real img2dataset against a loopback server, LLaVA json from local images."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tasks.core.identity import sha256_file
from tasks.data.build import BuildError, BuildResult, build_dataset
from tasks.data.image_checks import resize_image, sample_key, split_for
from tasks.data.img2dataset_runner import Img2DatasetNotFound, failure_reason, find_img2dataset, read_stats
from tasks.data.url_policy import HostPolicy, url_problem
from tasks.testkit.sample_tree import make_samples
from tasks.testkit.samples import SampleConfig

N_GOOD, N_MISSING, N_CORRUPT = 24, 3, 2
"""Rows serving a good image (the generated ones and the 4 planted copies), 404 rows, corrupt files."""
N_PLANTED = 4
"""Of the good rows: 2 planted eval images and 2 planted copies of training images."""
REFUSED_URLS = (
    "file:///etc/passwd",
    "ftp://127.0.0.1/images/000000.jpg",
    "http://169.254.169.254/latest/meta-data/iam",
    "http://10.1.2.3/cat.jpg",
)
CC3M_SPEC = """
name: t-cc3m
kind: image_text
profile: tiny
license: CC0-1.0
image_size: 48
resize_mode: keep_ratio
shard_samples: 10
heldout_fraction: 0.2
max_failure_ratio: 0.5
allow_hosts: [127.0.0.1]
filters: {min_caption_words: 2, max_caption_chars: 200, min_image_side: 16}
subsets:
  - {name: cc3m, source: {type: url_list, path: lists/urls.tsv, local_server: {root: samples}}}
"""


@pytest.fixture(scope="module", autouse=True)
def _ray() -> Iterator[None]:
    """One local Ray for the module; no progress bars; one img2dataset process."""
    import ray

    from tasks.core.parallel import ensure_ray

    saved = {k: os.environ.get(k) for k in ("MVLM_NO_PROGRESS", "MVLM_IMG2DATASET_PROCESSES")}
    os.environ.update(MVLM_NO_PROGRESS="1", MVLM_IMG2DATASET_PROCESSES="1")
    ensure_ray()
    yield
    ray.shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Sample images (good, 404, corrupt) and a URL list with refused, duplicate and empty-caption rows."""
    root = tmp_path_factory.mktemp("image_text")
    config = SampleConfig(
        n_images=N_GOOD - N_PLANTED,
        n_missing_urls=N_MISSING,
        n_corrupt_images=N_CORRUPT,
        n_docs_per_subset=2,
        dup_docs_per_subset=0,
        n_chats=1,
        vocab_size=300,
    )
    make_samples(root / "samples", config)
    text = (root / "samples" / "cc3m" / "urls.tsv").read_text()
    first_url = text.splitlines()[1].split("\t")[0]
    extra = [f"{url}\ta picture of a cat\n" for url in REFUSED_URLS]
    extra += [f"{first_url}\tthe same picture again\n", "{LOCAL_SERVER}/images/000001.jpg\t   \n"]
    (root / "lists").mkdir()
    (root / "lists" / "urls.tsv").write_text(text + "".join(extra))
    return root


def write_spec(folder: Path, text: str) -> Path:
    """Write a spec YAML named after its ``name:`` line."""
    name = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("name:"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def cc3m_build(data_root: Path) -> BuildResult:
    """The URL-list build (img2dataset downloading from the loopback server)."""
    return build_dataset(write_spec(data_root / "specs", CC3M_SPEC), data_root)


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every build output (work/ and unit records excluded)."""
    return {
        str(p.relative_to(folder)): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.parts[len(folder.parts)] not in ("work", "units")
    }


def test_url_list_counts_rejects_and_stats(cc3m_build: BuildResult) -> None:
    stats = cc3m_build.manifest["stats"]
    rows = N_GOOD + N_MISSING + N_CORRUPT + len(REFUSED_URLS) + 2
    assert stats["totals"]["read"] == rows
    assert stats["totals"]["kept"] == N_GOOD
    assert stats["totals"]["images"] == N_GOOD
    assert stats["rejects"] == {
        "decode_error": N_CORRUPT,
        "duplicate": 1,
        "empty_caption": 1,
        "http_404": N_MISSING,
        "url_refused": len(REFUSED_URLS),
    }
    rejects = [json.loads(line) for line in (cc3m_build.path / "rejects.jsonl").read_text().splitlines()]
    refused = {r["source"]: r["detail"] for r in rejects if r["reason"] == "url_refused"}
    assert set(refused) == set(REFUSED_URLS)
    assert "scheme 'file'" in refused["file:///etc/passwd"]
    assert "link-local" in refused["http://169.254.169.254/latest/meta-data/iam"]
    assert "private" in refused["http://10.1.2.3/cat.jpg"]
    assert all("missing_" in r["source"] for r in rejects if r["reason"] == "http_404")
    # img2dataset's own stats: 3 shards of <= 10 rows, successes + failures == count
    raw = cc3m_build.path / "work" / "cc3m" / "img2dataset"
    shard_stats = [read_stats(raw, k) for k in range(3)]
    assert sum(s.count for s in shard_stats) == N_GOOD + N_MISSING + N_CORRUPT
    # img2dataset only downloads (no decoding): the corrupt files are its successes and our decode_error
    assert sum(s.successes for s in shard_stats) == N_GOOD + N_CORRUPT
    assert sum(s.failed_to_download for s in shard_stats) == N_MISSING
    assert sum(s.failed_to_resize for s in shard_stats) == 0
    splits = {rec["split"] for rec in cc3m_build.manifest["shards"]}
    assert splits == {"train", "heldout"}
    assert sum(rec["samples"] for rec in cc3m_build.manifest["shards"]) == N_GOOD
    with Image.open(cc3m_build.path / "preview.png") as preview:
        assert preview.format == "PNG" and preview.size[0] > 0


def test_shards_read_with_webdataset_and_ray(cc3m_build: BuildResult) -> None:
    import ray.data
    import webdataset as wds

    tars = sorted(str(cc3m_build.path / rec["path"]) for rec in cc3m_build.manifest["shards"])
    samples = list(wds.WebDataset(tars, shardshuffle=False))
    assert len(samples) == N_GOOD
    for sample in samples:
        assert {"__key__", "jpg", "txt", "json"} <= set(sample)
        meta = json.loads(sample["json"])
        assert meta["key"] == sample["__key__"] and meta["caption"] == sample["txt"].decode()
        assert meta["url"].startswith("{LOCAL_SERVER}/images/")  # no port: deterministic
        assert not {"duration", "start_time", "end_time", "exif"} & set(meta)
        assert split_for(sample["__key__"], 0.2) in sample["__url__"]
        with Image.open(io.BytesIO(sample["jpg"])) as image:
            assert min(image.size) == 48  # keep_ratio: the smaller side becomes image_size
    for tar in tars:
        keys = [s["__key__"] for s in wds.WebDataset(tar, shardshuffle=False)]
        assert keys == sorted(keys)
    rows = ray.data.read_webdataset(tars).take_all()
    assert len(rows) == N_GOOD
    assert {"__key__", "jpg", "txt", "json"} <= set(rows[0])
    assert sorted(r["__key__"] for r in rows) == sorted(s["__key__"] for s in samples)


def test_rebuild_is_noop_and_resume_is_byte_identical(data_root: Path, cc3m_build: BuildResult) -> None:
    spec = data_root / "specs" / "t-cc3m.yaml"
    before = file_hashes(cc3m_build.path)
    again = build_dataset(spec, data_root)
    assert again.reused and again.build_id == cc3m_build.build_id
    # a killed build: unit 1 unrecorded, its img2dataset shard unfinished, another final shard truncated
    (cc3m_build.path / "units" / "00001.json").unlink()
    (cc3m_build.path / "work" / "cc3m" / "img2dataset" / "00000_stats.json").unlink()
    victim = next(r for r in cc3m_build.manifest["shards"] if r["path"].endswith("cc3m-00002-00000.tar"))
    with open(cc3m_build.path / victim["path"], "r+b") as handle:
        handle.truncate(victim["bytes"] // 2)
    resumed = build_dataset(spec, data_root)
    assert not resumed.reused
    assert read_stats(cc3m_build.path / "work" / "cc3m" / "img2dataset", 0).successes > 0  # downloaded again
    assert file_hashes(resumed.path) == before
    assert [r["sha256"] for r in resumed.manifest["shards"]] == [
        r["sha256"] for r in cc3m_build.manifest["shards"]
    ]


def test_url_policy() -> None:
    strict = HostPolicy.from_allow([])
    for url in (
        *REFUSED_URLS,
        "http://127.0.0.1:8000/a.jpg",
        "http://localhost/a.jpg",
        "http://[::1]/a.jpg",
        "http://[::ffff:169.254.169.254]/",
        "http://2130706433/a.jpg",
        "http://0x7f.1/a.jpg",
        "http://metadata.google.internal/computeMetadata/v1/",
        "http://192.168.1.1/x",
        "gopher://a.b/",
        "http://user:pw@example.com/a.jpg",
        "",
        "{LOCAL_SERVER}/images/a.jpg",
        "http:///nohost.jpg",
    ):
        assert url_problem(url, strict), url
    assert url_problem("https://example.com/a.jpg", strict) is None
    assert url_problem("http://93.184.216.34/a.jpg", strict) is None
    allowed = HostPolicy.from_allow(["127.0.0.1", "10.0.0.0/8", "localhost"])
    assert url_problem("http://127.0.0.1:8000/a.jpg", allowed) is None
    assert url_problem("http://10.1.2.3/cat.jpg", allowed) is None
    assert url_problem("http://localhost/a.jpg", allowed) is None
    assert url_problem("http://169.254.169.254/latest/meta-data", allowed)
    assert url_problem("file:///etc/passwd", allowed)


def test_failure_reasons_are_named() -> None:
    assert failure_reason("failed_to_download", "HTTP Error 404: File not found") == "http_404"
    assert failure_reason("failed_to_download", "HTTP Error 503: Service Unavailable") == "http_error"
    assert failure_reason("failed_to_download", "<urlopen error timed out>") == "timeout"
    assert failure_reason("failed_to_download", "The read operation timed out") == "timeout"
    assert failure_reason("failed_to_download", "<urlopen error [Errno 111] Connection refused>") == (
        "connection_error"
    )
    assert failure_reason("failed_to_resize", "Image decoding error") == "decode_error"
    assert failure_reason("failed_to_resize", "image too small") == "image_too_small"


def test_resize_modes_follow_img2dataset() -> None:
    image = Image.new("RGB", (80, 40), (200, 10, 10))
    assert resize_image(image, 32, "keep_ratio").size == (64, 32)  # the smaller side becomes 32
    assert resize_image(image, 32, "center_crop").size == (32, 32)
    assert resize_image(image, 32, "border").size == (32, 32)
    assert resize_image(image, 32, "no").size == (80, 40)
    # never upscales: a smaller image is stored as it is (border pads it, center_crop crops its square)
    assert resize_image(Image.new("RGB", (20, 10)), 32, "keep_ratio").size == (20, 10)
    assert resize_image(Image.new("RGB", (20, 10)), 32, "center_crop").size == (10, 10)
    assert resize_image(Image.new("RGB", (20, 10)), 32, "border").size == (32, 32)


def _jpeg(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (30, 160, 50)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _entry(ident: str, image: str, caption: str | None = "a green box on a table") -> dict:
    turns = [{"from": "human", "value": "<image>\nDescribe the image."}]
    if caption is not None:
        turns.append({"from": "gpt", "value": caption})
    return {"id": ident, "image": image, "conversations": turns}


def test_llava_json_refuses_paths_outside_root(tmp_path: Path) -> None:
    images = tmp_path / "llava" / "images"
    (images / "sub").mkdir(parents=True)
    (images / "wide.jpg").write_bytes(_jpeg((80, 40)))
    (images / "sub" / "square.jpg").write_bytes(_jpeg((40, 40)))
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "outside.jpg").write_bytes(_jpeg((40, 40)))
    (images / "escape.jpg").symlink_to(tmp_path / "outside.jpg")
    entries = [
        _entry("wide", "wide.jpg", "a green   box\non a table"),
        _entry("square", "sub/square.jpg"),
        _entry("abs", str(tmp_path / "outside.jpg")),
        _entry("dots", "../../outside.jpg"),
        _entry("link", "escape.jpg"),
        _entry("missing", "nope.jpg"),
        _entry("broken", "broken.jpg"),
        _entry("nocap", "wide.jpg", None),
    ]
    (tmp_path / "llava" / "pretrain.json").write_text(json.dumps(entries))
    spec = write_spec(
        tmp_path / "specs",
        """
name: t-llava
kind: image_text
license: CC0-1.0
image_size: 32
shard_samples: 4
max_failure_ratio: 0.9
subsets:
  - {name: blip, source: {type: llava_json, path: llava/pretrain.json, image_root: llava/images}}
""",
    )
    result = build_dataset(spec, tmp_path)
    assert result.manifest["stats"]["totals"]["read"] == len(entries)
    assert result.manifest["stats"]["rejects"] == {
        "decode_error": 1,
        "missing_caption": 1,
        "missing_image": 1,
        "path_outside_root": 3,
    }
    tars = [result.path / rec["path"] for rec in result.manifest["shards"]]
    from tasks.data.shard_read import read_tar_samples

    samples = {s["__key__"]: s for tar in tars for s in read_tar_samples(tar)}
    assert set(samples) == {sample_key("blip", "wide"), sample_key("blip", "square")}
    wide = samples["blip-wide"]
    assert wide["txt"] == b"a green box on a table"
    with Image.open(io.BytesIO(wide["jpg"])) as image:
        assert image.size == (64, 32)
    meta = json.loads(wide["json"])
    assert (meta["original_width"], meta["original_height"], meta["image"]) == (80, 40, "wide.jpg")


def test_failure_ratio_exceeded_names_the_reason(data_root: Path) -> None:
    text = CC3M_SPEC.replace("name: t-cc3m", "name: t-cc3m-strict").replace("allow_hosts: [127.0.0.1]\n", "")
    with pytest.raises(BuildError, match=r"t-cc3m-strict: .* rejected .*max_failure_ratio.*url_refused"):
        build_dataset(write_spec(data_root / "specs-strict", text), data_root)


def test_missing_img2dataset_names_the_make_target(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MVLM_IMG2DATASET", str(tmp_path / "nope" / "img2dataset"))
    with pytest.raises(Img2DatasetNotFound, match=r"make \.venv-img2dataset/\.installed"):
        find_img2dataset()


def test_url_list_near_identical_images_and_eval_images_are_rejected(data_root: Path) -> None:
    """``dedup.image`` and ``decontaminate`` on a URL list: the downloaded images are hashed, the planted
    copies of training images and of eval images (``tasks.testkit.planted``) are rejected, exactly."""
    from tasks.quality.eval_index import eval_index
    from tasks.testkit.sample_tree import load_summary

    spec = CC3M_SPEC.replace("name: t-cc3m", "name: t-cc3m-clean").replace(
        "subsets:", "dedup: {image: {max_distance: 16}, partitions: 3}\ndecontaminate: {}\nsubsets:"
    )
    index = eval_index("tiny", data_root)
    result = build_dataset(write_spec(data_root / "specs", spec), data_root, eval_index=index)
    summary = load_summary(data_root / "samples")
    rejects = [json.loads(line) for line in (result.path / "rejects.jsonl").read_text().splitlines()]
    found = {
        (r["reason"], r["source"].rsplit("/", 1)[1].removesuffix(".jpg"))
        for r in rejects
        if r["reason"] in ("near_duplicate_image", "eval_contamination")
    }
    expected = {("near_duplicate_image", row["id"]) for row in summary.planted["copies"]}
    expected |= {("eval_contamination", row["id"]) for row in summary.planted["eval_images"]}
    assert found == expected
    copies = {r["source"]: r["detail"] for r in rejects if r["reason"] == "near_duplicate_image"}
    for row in summary.planted["copies"]:  # the original is kept, named by its unit and sample key
        (detail,) = [d for src, d in copies.items() if src.endswith(f"/{row['id']}.jpg")]
        # the good rows come first in list order, so image 000007 is img2dataset's key 000007
        assert detail.startswith("near-identical image of cc3m ") and detail.endswith(f" cc3m-{row['of']}")
    assert result.manifest["stats"]["totals"]["kept"] == N_GOOD - N_PLANTED
