"""One image normalisation: every image of the hostile corpus gets the same fate and the same stored
bytes through a URL list (img2dataset, which only downloads), a LLaVA json and an instruct json."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator

import numpy as np
import pytest
from hostile_corpus import IMAGE_CASES, IMAGE_FILTERS, KEPT, write_images
from PIL import Image

from tasks.data.build import BuildResult, build_dataset
from tasks.data.shard_read import read_tar_samples

CAPTION = "A picture of a shape."
SPECS = {
    "route-urls": """kind: image_text
allow_hosts: [127.0.0.1]
subsets:
  - {name: main, source: {type: url_list, path: raw/urls.tsv, local_server: {root: img}}}
""",
    "route-llava": """kind: image_text
subsets:
  - {name: main, source: {type: llava_json, path: raw/pretrain.json, image_root: img}}
""",
    "route-instruct": """kind: instruct
subsets:
  - {name: main, source: {type: llava_json, path: raw/instruct.json, image_root: img}}
""",
}
COMMON = f"""profile: tiny
license: CC0-1.0
image_size: 32
shard_samples: 100
max_failure_ratio: 1.0
filters: {IMAGE_FILTERS}
"""


@pytest.fixture(scope="module")
def routes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, BuildResult]:
    import ray

    from tasks.core.parallel import ensure_ray

    root = tmp_path_factory.mktemp("routes")
    write_images(root)
    raw = root / "raw"
    raw.mkdir()
    lines = ["url\tcaption"] + [f"{{LOCAL_SERVER}}/{c.file}\t{CAPTION}" for c in IMAGE_CASES]
    (raw / "urls.tsv").write_text("\n".join(lines) + "\n")
    pretrain = [
        {"id": f"i{i}", "image": c.file, "conversations": [
            {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": CAPTION}]}
        for i, c in enumerate(IMAGE_CASES)
    ]  # fmt: skip
    (raw / "pretrain.json").write_text(json.dumps(pretrain))
    (raw / "instruct.json").write_text(json.dumps(pretrain))
    specs = root / "specs"
    specs.mkdir()
    for name, body in SPECS.items():
        (specs / f"{name}.yaml").write_text(f"name: {name}\n{COMMON}{body}")
    saved = {k: os.environ.get(k) for k in ("MVLM_NO_PROGRESS", "MVLM_IMG2DATASET_PROCESSES")}
    os.environ.update(MVLM_NO_PROGRESS="1", MVLM_IMG2DATASET_PROCESSES="1")
    ensure_ray()
    try:
        return {name: build_dataset(specs / f"{name}.yaml", root) for name in SPECS}
    finally:
        ray.shutdown()
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def _samples(result: BuildResult) -> Iterator[dict[str, bytes]]:
    for record in result.manifest["shards"]:
        yield from read_tar_samples(result.path / record["path"])


def _fates(name: str, result: BuildResult) -> dict[str, tuple[str, object]]:
    """file -> ("kept", jpeg bytes) or ("rejected", (reason, detail)) on one route."""
    fates: dict[str, tuple[str, object]] = {}
    for sample in _samples(result):
        meta = json.loads(sample["json"])
        file = meta["url"].split("}/", 1)[1] if name == "route-urls" else meta["image"]
        fates[file] = ("kept", sample["jpg"])
    for line in (result.path / "rejects.jsonl").read_text().splitlines():
        row = json.loads(line)
        if name == "route-urls":
            file = row["source"].split("}/", 1)[1]
        else:
            file = IMAGE_CASES[int(row["where"].split()[1])].file
        fates[file] = ("rejected", (row["reason"], row["detail"]))
    return fates


def test_every_image_has_one_fate_and_the_same_stored_bytes_on_every_route(
    routes: dict[str, BuildResult],
) -> None:
    fates = {name: _fates(name, result) for name, result in routes.items()}
    for case in IMAGE_CASES:
        seen = {name: fates[name].get(case.file) for name in routes}
        assert all(seen.values()), f"{case.file}: missing on a route: {seen}"
        kinds = {name: fate[0] for name, fate in seen.items()}
        if case.fate == KEPT:
            assert set(kinds.values()) == {"kept"}, f"{case.file}: {seen}"
            stored = {fate[1] for fate in seen.values()}
            assert len(stored) == 1, f"{case.file}: the routes stored different bytes"
        else:
            reasons = {name: fate[1][0] for name, fate in seen.items() if fate[0] == "rejected"}
            assert reasons == dict.fromkeys(routes, case.fate[1]), f"{case.file}: {seen}"


def test_stored_pixels_follow_the_one_policy(routes: dict[str, BuildResult]) -> None:
    """16-bit grey scaled (not white), alpha on white, EXIF orientation applied, CMYK and GIF converted."""
    fates = _fates("route-urls", routes["route-urls"])
    for case in (c for c in IMAGE_CASES if c.fate == KEPT):
        with Image.open(io.BytesIO(fates[case.file][1])) as image:
            assert image.mode == "RGB", case.file
            pixels = np.asarray(image, dtype=np.float64)
        height, width = pixels.shape[:2]
        if case.portrait is not None:
            assert (height > width) == case.portrait, (case.file, width, height)
        for (left, top, right, bottom), colour in case.regions:
            box = pixels[int(top * height) : int(bottom * height), int(left * width) : int(right * width)]
            mean = box.reshape(-1, 3).mean(axis=0)
            assert np.abs(mean - colour).max() <= 4, (case.file, mean.round(1).tolist(), colour)


def test_reject_details_are_our_sentences(routes: dict[str, BuildResult]) -> None:
    """No decoder or OpenCV text: a rejected image says the limit and the value."""
    for name, result in routes.items():
        for file, (kind, value) in _fates(name, result).items():
            if kind != "rejected":
                continue
            reason, detail = value
            assert not any(
                w in detail for w in ("cv2", "OpenCV", "Traceback", "tobytes", "PIL", "cannot identify")
            )
            limits = ("max_image_pixels", "min_image_side", "> 20.0")
            if reason in ("image_too_large", "image_too_small", "bad_aspect_ratio"):
                assert any(limit in detail for limit in limits), (file, detail)
