"""Instruct and chat builds: every hostile record meets its expected fate (real Ray, real images)."""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tasks.core.identity import sha256_file
from tasks.data.build import BuildError, BuildResult, build_dataset
from tasks.data.shard_read import read_tar_samples

pytestmark = pytest.mark.usefixtures("ray_local")

SPEC = """\
name: {name}
kind: {kind}
profile: tiny
license: CC0-1.0
{image_size}shard_samples: {shard_samples}
heldout_fraction: {heldout}
max_failure_ratio: {ratio}
filters: {{max_chars: 500, max_image_pixels: 1000000}}
subsets:
  - {{name: main, source: {{type: llava_json, path: raw/{file}{image_root}}}}}
"""

KEPT = "kept"
ABSOLUTE = "<absolute path of outside/secret.jpg>"  # replaced by the real path when the corpus is written


def _conv(*values: str) -> list[dict[str, str]]:
    """Alternating human/gpt turns with the given values."""
    return [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(values)]


def _img(image: Any, ident: str, conv: Any = None) -> dict[str, Any]:
    return {"id": ident, "image": image, "conversations": conv or _conv("<image>\nWhat is it?", "A shape.")}


GOOD_CONV = _conv("<image>\n¿Qué color tiene la forma?", "rojo", "And the shape?", "A rectangle.")

# (case id, record, expected fate); the record at position i is "record i" in rejects.jsonl.
INSTRUCT_CASES: list[tuple[str, Any, str]] = [
    ("good_image", {"id": "good", "image": "good.jpg", "conversations": GOOD_CONV}, KEPT),
    ("text_only", {"id": "text", "conversations": _conv("Name a colour.", "Blue.")}, KEPT),
    ("small_image_not_upscaled", _img("small.png", "small"), KEPT),
    ("nested_path", _img("sub/dir/nested.jpg", "nested"), KEPT),
    ("cmyk_jpeg", _img("cmyk.jpg", "cmyk"), KEPT),
    ("grey_16bit_png", _img("grey16.png", "grey16"), KEPT),
    ("animated_gif", _img("anim.gif", "anim"), KEPT),
    ("two_humans", _img("good.jpg", "r1", _conv("<image>\nHi", "Hello")[:1] * 2), "bad_conversation"),
    ("gpt_first", _img("good.jpg", "r2", [{"from": "gpt", "value": "<image>\nHi"}]), "bad_conversation"),
    ("ends_with_human", _img("good.jpg", "r3", _conv("<image>\nHi", "Hello", "Bye?")), "bad_conversation"),
    ("empty_conversations", {"id": "r4", "conversations": []}, "bad_conversation"),
    ("conversations_not_a_list", {"id": "r5", "conversations": "human: hi"}, "bad_conversation"),
    ("no_conversations", {"id": "r6", "image": "good.jpg"}, "bad_conversation"),
    ("turn_not_an_object", {"id": "r7", "conversations": ["hi", "there"]}, "bad_conversation"),
    ("blank_turn", {"id": "r8", "conversations": _conv("Hi", "  ")}, "bad_conversation"),
    ("image_in_gpt_turn", {"id": "r9", "conversations": _conv("Hi", "<image>")}, "bad_conversation"),
    ("image_twice", _img("good.jpg", "p1", _conv("<image>\n<image>\nHi", "Hello")), "image_placeholder"),
    (
        "image_later_turn",
        _img("good.jpg", "p2", _conv("Hi", "Hello", "<image>\nAnd?", "No.")),
        "image_placeholder",
    ),
    (
        "image_first_and_later",
        _img("good.jpg", "p3", _conv("<image>\nA", "B", "<image>\nC", "D")),
        "image_placeholder",
    ),
    (
        "image_without_placeholder",
        _img("good.jpg", "p4", _conv("What is it?", "A shape.")),
        "image_placeholder",
    ),
    (
        "placeholder_text_only",
        {"id": "p5", "conversations": _conv("<image>\nHi", "Hello")},
        "image_placeholder",
    ),
    ("absolute_path", _img(ABSOLUTE, "x1"), "path_outside_root"),
    ("dotdot_path", _img("../outside/secret.jpg", "x2"), "path_outside_root"),
    ("dotdot_inside_path", _img("sub/../../outside/secret.jpg", "x3"), "path_outside_root"),
    ("backslash_path", _img("sub\\dir\\nested.jpg", "x4"), "path_outside_root"),
    ("symlink_escape", _img("escape.jpg", "x5"), "path_outside_root"),
    ("missing_file", _img("nope.jpg", "m1"), "missing_image"),
    ("directory_not_file", _img("sub", "m2"), "missing_image"),
    ("image_field_empty", _img("", "f1"), "bad_image_field"),
    ("image_field_number", _img(7, "f2"), "bad_image_field"),
    ("truncated_jpeg", _img("truncated.jpg", "b1"), "decode_error"),
    ("zero_bytes", _img("zero.jpg", "b2"), "decode_error"),
    ("not_an_image", _img("text.jpg", "b3"), "decode_error"),
    ("decompression_bomb", _img("bomb.png", "l1"), "image_too_large"),
    ("over_max_pixels", _img("large.png", "l2"), "image_too_large"),
    ("too_small", _img("tiny.png", "s1"), "image_too_small"),
    ("extreme_aspect_ratio", _img("wide.png", "a1"), "bad_aspect_ratio"),
    ("duplicate_id", {"id": "good", "conversations": _conv("A second good?", "No.")}, "duplicate_id"),
    ("turn_too_long", {"id": "t1", "conversations": _conv("Hi", "x" * 501)}, "too_long"),
    ("turn_at_max_chars", {"id": "t2", "conversations": _conv("Hi", "y" * 500)}, KEPT),
    ("record_is_string", "just a string", "invalid_record"),
    ("record_is_number", 42, "invalid_record"),
    ("record_is_null", None, "invalid_record"),
    ("record_is_list", [{"id": "z"}], "invalid_record"),
]

CHAT_CASES: list[tuple[str, Any, str]] = [
    ("chat_good", {"id": "c1", "conversations": _conv("Hello!", "Hi.", "How many sides?", "Four.")}, KEPT),
    ("chat_with_image", _img("good.jpg", "c2"), "unexpected_image"),
    ("chat_placeholder", {"id": "c3", "conversations": _conv("<image>\nHi", "Hello")}, "image_placeholder"),
    ("chat_gpt_first", {"id": "c4", "conversations": [{"from": "gpt", "value": "Hi"}]}, "bad_conversation"),
    ("chat_duplicate", {"id": "c1", "conversations": _conv("Again", "Yes.")}, "duplicate_id"),
    ("chat_no_id", {"conversations": _conv("Anonymous?", "Yes.")}, KEPT),
]


# --- corpus --------------------------------------------------------------------------------------


def _save(image: Image.Image, path: Path, **kwargs: Any) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path.read_bytes()


def _write_images(root: Path) -> None:
    img, outside = root / "img", root / "outside"
    good = _save(Image.new("RGB", (200, 100), (200, 30, 30)), img / "good.jpg", quality=95)
    _save(Image.new("RGB", (40, 30), (30, 160, 50)), img / "small.png")
    _save(Image.new("RGB", (90, 90), (40, 70, 225)), img / "sub" / "dir" / "nested.jpg")
    _save(Image.new("CMYK", (100, 80), (0, 255, 255, 0)), img / "cmyk.jpg")  # pure red in CMYK
    grey16 = Image.fromarray(np.full((70, 90), 40000, dtype=np.uint16))
    assert grey16.mode == "I;16"
    _save(grey16, img / "grey16.png")
    frames = [Image.new("RGB", (50, 50), c).convert("P") for c in ((0, 0, 255), (255, 255, 0), (0, 255, 0))]
    frames[0].save(img / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    (img / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (img / "zero.jpg").write_bytes(b"")
    (img / "text.jpg").write_bytes(b"GIF89a? no: these bytes are not an image at all\n" * 4)
    _save(Image.new("1", (6000, 6000), 0), img / "bomb.png")  # 36 Mpx in a few KB (> 2x the limit)
    _save(Image.new("L", (1200, 1000), 128), img / "large.png")  # 1.2 Mpx > max_image_pixels 1 Mpx
    _save(Image.new("RGB", (6, 40), (1, 2, 3)), img / "tiny.png")  # below min_image_side 8
    _save(Image.new("RGB", (420, 20), (9, 9, 9)), img / "wide.png")  # 21:1 > max_aspect_ratio 20
    _save(Image.new("RGB", (64, 64), (255, 255, 255)), outside / "secret.jpg")
    (img / "escape.jpg").symlink_to(outside / "secret.jpg")


def _write_corpus(root: Path, name: str, cases: list[tuple[str, Any, str]]) -> None:
    records = [_absolute(rec, root) for _, rec, _ in cases]
    text = json.dumps(records, ensure_ascii=False, indent=1)
    (root / "raw").mkdir(parents=True, exist_ok=True)
    (root / "raw" / name).write_bytes(b"\xef\xbb\xbf" + text.encode())  # UTF-8 BOM, as Windows tools write


def _absolute(record: Any, root: Path) -> Any:
    if isinstance(record, dict) and record.get("image") == ABSOLUTE:
        return {**record, "image": str(root / "outside" / "secret.jpg")}
    return record


def _spec(
    folder: Path,
    name: str,
    kind: str = "instruct",
    file: str = "instruct.json",
    shard_samples: int = 8,
    heldout: float = 0.0,
    ratio: float = 1.0,
) -> Path:
    path = folder / "specs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    image = kind == "instruct"
    path.write_text(
        SPEC.format(
            name=name,
            kind=kind,
            file=file,
            shard_samples=shard_samples,
            heldout=heldout,
            ratio=ratio,
            image_size="image_size: 64\n" if image else "",
            image_root=", image_root: img" if image else "",
        )
    )
    return path


def _samples(result: BuildResult, split: str | None = None) -> dict[str, dict[str, bytes]]:
    """Every sample of a build by its ``id``."""
    out = {}
    for rec in result.manifest["shards"]:
        if split is None or rec["split"] == split:
            for sample in read_tar_samples(result.path / rec["path"]):
                out[json.loads(sample["json"])["id"]] = sample
    return out


def _rejects(result: BuildResult) -> dict[str, str]:
    rows = [json.loads(line) for line in (result.path / "rejects.jsonl").read_text().splitlines()]
    return {row["where"]: row["reason"] for row in rows}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> tuple[Path, BuildResult]:
    root = tmp_path_factory.mktemp("instruct_root")
    _write_images(root)
    _write_corpus(root, "instruct.json", INSTRUCT_CASES)
    return root, build_dataset(_spec(root, "hostile-instruct"), root)


@pytest.fixture(scope="module")
def chat(tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> BuildResult:
    root = tmp_path_factory.mktemp("chat_root")
    _write_corpus(root, "chat.json", CHAT_CASES)
    return build_dataset(_spec(root, "hostile-chat", kind="chat", file="chat.json"), root)


# --- fates ---------------------------------------------------------------------------------------


def _check_fate(result: BuildResult, cases: list[tuple[str, Any, str]], index: int) -> None:
    _, record, expected = cases[index]
    rejects = _rejects(result)
    where = f"record {index}"
    if expected == KEPT:
        assert where not in rejects, f"expected kept, rejected as {rejects.get(where)}"
        key = f"main-{index:08d}"
        sample = next(s for s in _samples(result).values() if s["__key__"] == key)
        meta = json.loads(sample["json"])
        assert meta["id"] == str(record.get("id", key))
        assert meta["conversations"] == record["conversations"]
        assert ("jpg" in sample) == ("image" in record)
    else:
        assert rejects.get(where) == expected


@pytest.mark.parametrize("index", range(len(INSTRUCT_CASES)), ids=[c[0] for c in INSTRUCT_CASES])
def test_instruct_record_fate(hostile: tuple[Path, BuildResult], index: int) -> None:
    _check_fate(hostile[1], INSTRUCT_CASES, index)


@pytest.mark.parametrize("index", range(len(CHAT_CASES)), ids=[c[0] for c in CHAT_CASES])
def test_chat_record_fate(chat: BuildResult, index: int) -> None:
    _check_fate(chat, CHAT_CASES, index)


def test_counts_and_rejects_file_match_the_cases(
    hostile: tuple[Path, BuildResult], chat: BuildResult
) -> None:
    for result, cases in ((hostile[1], INSTRUCT_CASES), (chat, CHAT_CASES)):
        expected = Counter(fate for _, _, fate in cases if fate != KEPT)
        stats = result.manifest["stats"]
        assert stats["rejects"] == dict(sorted(expected.items()))
        kept = sum(fate == KEPT for _, _, fate in cases)
        totals = stats["totals"]
        assert (totals["read"], totals["kept"], totals["rejected"]) == (len(cases), kept, len(cases) - kept)
        assert len(_rejects(result)) == len(cases) - kept
        assert sum(r["samples"] for r in result.manifest["shards"]) == kept
    images = sum(fate == KEPT and isinstance(r, dict) and "image" in r for _, r, fate in INSTRUCT_CASES)
    assert hostile[1].manifest["stats"]["totals"]["images"] == images == 6
    assert chat.manifest["stats"]["totals"]["images"] == 0


def test_kept_image_sample_is_exact(hostile: tuple[Path, BuildResult]) -> None:
    assert (hostile[0] / "raw" / "instruct.json").read_bytes()[:3] == b"\xef\xbb\xbf"  # BOM read fine
    samples = _samples(hostile[1])
    good = samples["good"]
    assert good["__key__"] == "main-00000000"
    meta = {"conversations": GOOD_CONV, "id": "good", "image": "good.jpg", "subset": "main"}
    assert good["json"] == json.dumps(meta, sort_keys=True, ensure_ascii=False).encode()
    assert json.loads(good["json"])["conversations"] == GOOD_CONV  # the first "good" wins over the duplicate
    text = samples["text"]
    assert set(text) == {"__key__", "json"}
    assert json.loads(text["json"])["image"] is None
    expected = {"good": (128, 64), "small": (40, 30), "nested": (64, 64), "cmyk": (80, 64)}
    expected |= {"grey16": (82, 64), "anim": (50, 50)}
    for ident, size in expected.items():
        image = Image.open(io.BytesIO(samples[ident]["jpg"]))
        image.load()
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", size), ident
        assert min(image.size) <= 64


@pytest.mark.parametrize(
    ("ident", "colour"),
    [
        ("good", (200, 30, 30)),
        ("cmyk", (255, 0, 0)),
        ("grey16", (156, 156, 156)),  # 40000 / 65535 of full scale, not clipped to white
        ("anim", (0, 0, 255)),  # the first frame
    ],
)
def test_converted_images_keep_their_colours(
    hostile: tuple[Path, BuildResult], ident: str, colour: tuple[int, int, int]
) -> None:
    image = Image.open(io.BytesIO(_samples(hostile[1])[ident]["jpg"]))
    centre = image.getpixel((image.width // 2, image.height // 2))
    assert all(abs(a - b) <= 3 for a, b in zip(centre, colour, strict=True)), (ident, centre)


# --- splits, resume, failure ratio ----------------------------------------------------------------


def _split_corpus(n: int) -> list[dict[str, Any]]:
    return [
        _img("good.jpg", f"q{i:03d}")
        if i % 4 == 0
        else {"id": f"q{i:03d}", "conversations": _conv("Q?", "A.")}
        for i in range(n)
    ]


def _write_split_root(root: Path, records: list[dict[str, Any]]) -> None:
    (root / "img").mkdir(parents=True)
    _save(Image.new("RGB", (80, 60), (10, 20, 30)), root / "img" / "good.jpg")
    (root / "raw").mkdir()
    (root / "raw" / "instruct.json").write_text(json.dumps(records))


def test_heldout_split_is_decided_by_image_then_id(tmp_path: Path) -> None:
    """Every conversation about one image lands in one split (no held-out image is trained on); a
    text-only record is placed by its id. Neither depends on the record order."""
    records = _split_corpus(60)
    results = []
    for folder, order in (("a", records), ("b", records[::-1])):
        _write_split_root(tmp_path / folder, order)
        spec = _spec(tmp_path / folder, "split-instruct", shard_samples=16, heldout=0.3, ratio=0.0)
        results.append(build_dataset(spec, tmp_path / folder))
    ids = [r["id"] for r in records]

    def held_out(record: dict[str, Any]) -> bool:
        key = record.get("image") or record["id"]
        return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 2**32 < 0.3

    expected = {r["id"] for r in records if held_out(r)}
    assert 5 < len(expected) < 30
    with_image = {r["id"] for r in records if r.get("image")}
    assert with_image <= expected or not with_image & expected  # the one image: all or none
    for result in results:
        assert set(_samples(result, "heldout")) == expected
        assert set(_samples(result, "train")) == set(ids) - expected
        for ident, sample in _samples(result).items():
            assert ("jpg" in sample) == (int(ident[1:]) % 4 == 0)
    assert results[0].build_id != results[1].build_id  # different source bytes, same assignment


def test_resume_after_lost_unit_record_and_torn_shard_is_byte_identical(tmp_path: Path) -> None:
    _write_split_root(tmp_path, _split_corpus(40))
    spec = _spec(tmp_path, "resume-instruct", shard_samples=10, heldout=0.3, ratio=0.0)
    first = build_dataset(spec, tmp_path)
    files = sorted(p for p in first.path.rglob("*") if p.is_file())
    digests = {p.relative_to(first.path): sha256_file(p) for p in files}
    assert {rec["split"] for rec in first.manifest["shards"]} == {"train", "heldout"}
    assert len(list((first.path / "units").glob("*.json"))) == 4  # one record per unit
    assert len(list((first.path / "units").glob("*.rejects.jsonl"))) == 4  # and its reject rows
    (first.path / "units" / "00001.json").unlink()
    torn = next(first.path / r["path"] for r in first.manifest["shards"] if "-00002" in r["path"])
    torn.write_bytes(torn.read_bytes()[:700])
    resumed = build_dataset(spec, tmp_path)
    assert not resumed.reused and resumed.build_id == first.build_id
    now = sorted(p for p in resumed.path.rglob("*") if p.is_file())
    assert {p.relative_to(resumed.path): sha256_file(p) for p in now} == digests
    assert build_dataset(spec, tmp_path).reused


def test_failure_ratio_exceeded_raises_build_error(hostile: tuple[Path, BuildResult]) -> None:
    root = hostile[0]
    rejected = sum(fate != KEPT for _, _, fate in INSTRUCT_CASES)
    with pytest.raises(BuildError) as err:
        build_dataset(_spec(root, "strict-instruct", ratio=0.5), root)
    message = str(err.value)
    assert f"strict-instruct: {rejected} of {len(INSTRUCT_CASES)} samples rejected" in message
    assert "max_failure_ratio 50.0%" in message and "rejects.jsonl" in message
    assert not list((root / "builds" / "strict-instruct").glob("*/manifest.json"))


def test_pixel_limit_is_restored_after_each_image(hostile: tuple[Path, BuildResult]) -> None:
    """The spec's max_image_pixels must not stay in Pillow's process-wide limit (Ray workers are shared
    with other builders): a 1 Mpx limit left behind would refuse every larger image elsewhere."""
    from tasks.data.instruct import SampleError, load_image_bytes
    from tasks.data.specs import load_spec

    root = hostile[0]
    spec = load_spec(root / "specs" / "hostile-instruct.yaml")
    default = Image.MAX_IMAGE_PIXELS
    assert spec.filters.max_image_pixels != default
    for name, reason in (("good.jpg", None), ("bomb.png", "image_too_large"), ("zero.jpg", "decode_error")):
        if reason is None:
            assert load_image_bytes(root / "img" / name, spec)[:2] == b"\xff\xd8"
        else:
            with pytest.raises(SampleError) as err:
                load_image_bytes(root / "img" / name, spec)
            assert err.value.reason == reason
        assert default == Image.MAX_IMAGE_PIXELS, name
