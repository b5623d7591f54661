"""Near-identical images and eval decontamination: planted copies are found, exactly those."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.data.build import BuildError, build_dataset
from tasks.data.builder import serial_map
from tasks.quality.eval_index import eval_index
from tasks.quality.eval_sets import read_eval_set
from tasks.quality.eval_specs import load_eval_specs

SPEC = """\
name: {name}
kind: {kind}
profile: tiny
license: CC0-1.0
image_size: 64
shard_samples: 16
max_failure_ratio: 0.5
{extra}
subsets:
  - {{name: main, source: {{type: llava_json, path: world/data.json, image_root: world/images}}}}
"""
DISTINCT = 40


def _picture(seed: int) -> Image.Image:
    """A smooth, photo-like picture: random 6x6 colours blown up (distinct phash per seed)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8))
    return small.resize((96, 96), Image.BICUBIC)


@pytest.fixture
def world(samples_root: Path, tmp_path: Path) -> tuple[Path, dict[str, set[str]]]:
    """A data root: the tiny eval sets, and a LLaVA json of distinct pictures with planted near-copies,
    eval images and an eval question; returns the root and the planted ids by the reason expected."""
    root = tmp_path / "root"
    (root / "world" / "images").mkdir(parents=True)
    (root / "samples").symlink_to(samples_root / "samples")
    spec = load_eval_specs()["tiny-mmbench"][1]
    items = read_eval_set(spec.model_copy(update={"limit": None}), root).items
    question = max((i.prompt.removesuffix(spec.instruction).strip() for i in items), key=len)
    entries, planted = (
        [],
        {"near_duplicate_image": set(), "eval_contamination": set(), "eval_contamination_text": set()},
    )

    def add(ident: str, image: Image.Image, caption: str, quality: int = 95) -> None:
        image.save(root / "world" / "images" / f"{ident}.jpg", quality=quality)
        turns = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": caption}]
        entries.append({"id": ident, "image": f"{ident}.jpg", "conversations": turns})

    for i in range(DISTINCT):
        add(f"pic{i:03d}", _picture(i), f"picture number {i}")
    for i in (3, 11, 27):  # resized and re-encoded copies
        add(f"copy{i:03d}", _picture(i).resize((80, 80)), f"another look at picture {i}", quality=70)
        planted["near_duplicate_image"].add(f"copy{i:03d}")
    for n, name in enumerate(("gqa/images/900001.jpg", "pope/val2014/COCO_val2014_900005.jpg")):
        with Image.open(samples_root / "samples" / "eval" / name) as image:
            add(f"evalimg{n}", image.convert("RGB"), f"a scene {n}")
        planted["eval_contamination"].add(f"evalimg{n}")
    add("evaltext0", _picture(500), f"Someone asked: {question} and nobody answered.")
    planted["eval_contamination_text"].add("evaltext0")
    (root / "world" / "data.json").write_text(json.dumps(entries))
    return root, planted


def _spec(tmp_path: Path, name: str, kind: str, extra: str) -> Path:
    path = tmp_path / "specs" / f"{name}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(SPEC.format(name=name, kind=kind, extra=extra))
    return path


def _rejected(build: Path) -> dict[str, set[str]]:
    entries = json.loads((build.parents[2] / "world" / "data.json").read_text())
    out: dict[str, set[str]] = {}
    for line in (build / "rejects.jsonl").read_text().splitlines():
        row = json.loads(line)
        index = int(row["where"].split()[-1])
        out.setdefault(row["reason"], set()).add(entries[index]["id"])
    return out


def test_image_text_build_finds_exactly_the_planted_copies_and_eval_data(world, tmp_path: Path) -> None:
    root, planted = world
    extra = "dedup: {image: {max_distance: 16}, partitions: 4}\ndecontaminate: {max_distance: 16}"
    spec = _spec(tmp_path, "world-pairs", "image_text", extra)
    with pytest.raises(BuildError, match="decontaminate is set"):
        build_dataset(spec, root, fan_out=serial_map)
    index = eval_index("tiny", root)
    result = build_dataset(spec, root, fan_out=serial_map, eval_index=index)
    assert _rejected(result.path) == planted
    detail = next(json.loads(r)["detail"] for r in (result.path / "rejects.jsonl").read_text().splitlines()
                  if "near_duplicate_image" in r)  # fmt: skip
    assert "near-identical image of main data.json" in detail
    report = json.loads((result.path / "contamination.json").read_text())
    images = {name: s["images"] for name, s in report["eval_sets"].items() if s["images"]}
    questions = {name: s["questions"] for name, s in report["eval_sets"].items() if s["questions"]}
    # each image counts under every eval set that shows it: both are images of the pool that GQA, MME,
    # POPE and MMBench share; ScienceQA has one of them
    both, one = {"main": 2}, {"main": 1}
    assert images == {
        "tiny-gqa": both,
        "tiny-mmbench": both,
        "tiny-mme": both,
        "tiny-pope": both,
        "tiny-sqa": one,
    }
    assert questions == {"tiny-mmbench": {"main": 1}}
    assert report["eval_sets"]["tiny-gqa"]["checked"]["images"] > 0 and report["not_checked"] == []
    assert result.manifest["stats"]["totals"]["kept"] == DISTINCT


def test_instruct_build_rejects_eval_images_and_questions_but_keeps_shared_images(
    world, tmp_path: Path
) -> None:
    root, planted = world
    data = root / "world" / "data.json"
    entries = json.loads(data.read_text())
    entries.append({**entries[0], "id": "same-image-other-talk"})  # conversations may share an image
    data.write_text(json.dumps(entries))
    spec = _spec(tmp_path, "world-talk", "instruct", "decontaminate: {max_distance: 16}")
    result = build_dataset(spec, root, fan_out=serial_map, eval_index=eval_index("tiny", root))
    expected = {k: v for k, v in planted.items() if k != "near_duplicate_image"}
    assert _rejected(result.path) == expected
    assert result.manifest["stats"]["totals"]["kept"] == DISTINCT + 3 + 1


def test_eval_index_changes_the_build_identity(world, tmp_path: Path) -> None:
    root, _ = world
    spec = _spec(tmp_path, "world-id", "instruct", "decontaminate: {max_distance: 16}")
    first = build_dataset(spec, root, fan_out=serial_map, eval_index=eval_index("tiny", root))
    fewer = eval_index("tiny", root)
    smaller = type(fewer)(fewer.images[1:], fewer.ngrams, fewer.ngram, fewer.sets, fewer.missing)
    second = build_dataset(spec, root, fan_out=serial_map, eval_index=smaller)
    assert first.build_id != second.build_id
    renamed = type(fewer)(fewer.images, {g: ("another-set", q) for g, (_, q) in fewer.ngrams.items()},
                          fewer.ngram, fewer.sets, fewer.missing)  # fmt: skip
    assert renamed.digest != fewer.digest  # what a report names is part of the identity too
    recounted = type(fewer)(fewer.images, fewer.ngrams, fewer.ngram, {**fewer.sets, "x": {}}, fewer.missing)
    assert recounted.digest != fewer.digest


def test_the_contamination_report_is_an_artifact_of_the_build_run(world, tmp_path: Path) -> None:
    from tasks.lineage import tracking
    from tasks.lineage.publish import log_build

    root, _ = world
    spec = _spec(tmp_path, "world-run", "instruct", "decontaminate: {max_distance: 16}")
    result = build_dataset(spec, root, fan_out=serial_map, eval_index=eval_index("tiny", root))
    mlflow = tracking.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent, _ = tracking.run_for(mlflow, tracking.EXPERIMENT, "retrain/contamination", "retrain")
    summary = {"name": result.name, "build_id": result.build_id, "path": str(result.path), "kind": "instruct",
               "totals": result.manifest["stats"]["totals"]}  # fmt: skip
    run_id = log_build(mlflow, summary, parent)
    assert "contamination.json" in [f.path for f in mlflow.list_artifacts(run_id)]
    local = Path(mlflow.download_artifacts(run_id, "contamination.json", str(tmp_path / "dl")))
    report = json.loads(local.read_text())
    assert (
        sum(s["images"].get("main", 0) for s in report["eval_sets"].values()) == 9
    )  # (image, eval set) pairs


def test_text_build_rejects_documents_holding_an_eval_question(world, tmp_path: Path) -> None:
    root, _ = world
    spec = load_eval_specs()["tiny-mmbench"][1]
    items = read_eval_set(spec.model_copy(update={"limit": None}), root).items
    question = max((i.prompt.removesuffix(spec.instruction).strip() for i in items), key=len)
    docs = [f"An ordinary document number {i} about circles and squares." for i in range(20)]
    docs[7] = f"A forum post quoting a benchmark: {question} Answers below."
    (root / "world" / "web.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    path = tmp_path / "specs" / "world-text.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(
        "name: world-text\nkind: text\nprofile: tiny\nlicense: CC0-1.0\ntokenizer: samples/tokenizer\n"
        "seq_len: 16\nmax_failure_ratio: 0.5\ndecontaminate: {}\n"
        "subsets:\n  - {name: web, source: {type: files, paths: [world/web.jsonl]}}\n"
    )
    result = build_dataset(path, root, fan_out=serial_map, eval_index=eval_index("tiny", root))
    rows = [json.loads(r) for r in (result.path / "rejects.jsonl").read_text().splitlines()]
    assert [(r["reason"], r["where"]) for r in rows] == [("eval_contamination_text", "line 8")]
    assert rows[0]["detail"].startswith("tiny-mmbench: shares a 13-word sequence with question")
    report = json.loads((result.path / "contamination.json").read_text())
    assert report["eval_sets"]["tiny-mmbench"]["questions"] == {"web": 1}


TINY_EXPECTED = {  # spec -> (subset, samples file, reason -> what of SampleSummary.planted is rejected)
    "tiny-llava-pretrain": (
        "pretrain",
        "llava/pretrain.json",
        {"eval_contamination": "eval_images", "near_duplicate_image": "copies"},
    ),
    "tiny-llava-instruct": (
        "instruct",
        "llava/instruct.json",
        {"eval_contamination": "eval_images", "eval_contamination_text": "llava/instruct.json"},
    ),
    "tiny-sharegpt": ("chat", "sharegpt/chat.json", {"eval_contamination_text": "sharegpt/chat.json"}),
}


def _planted(summary, what: str) -> set[str]:
    if what in summary.planted:
        return {r["id"] for r in summary.planted[what]}
    return {r["id"] for r in summary.planted["eval_questions"] if r["source"] == what}


@pytest.mark.parametrize("name", sorted(TINY_EXPECTED))
def test_tiny_builds_reject_exactly_the_samples_planted_in_the_tiny_sources(
    samples_root: Path, name: str
) -> None:
    """The tiny profile's own sources hold a few eval images, eval questions and copies of training
    images (``tasks.testkit.planted``): its decontaminated builds reject those and nothing else."""
    from tasks.testkit.sample_tree import load_summary

    summary = load_summary(samples_root / "samples")
    subset, source, reasons = TINY_EXPECTED[name]
    planted = {reason: _planted(summary, what) for reason, what in reasons.items()}
    spec = Path(__file__).resolve().parent.parent / "data_specs" / f"{name}.yaml"
    index = eval_index("tiny", samples_root)
    result = build_dataset(spec, samples_root, fan_out=serial_map, eval_index=index)
    entries = json.loads((samples_root / "samples" / source).read_text())
    found: dict[str, set[str]] = {}
    details: dict[str, str] = {}
    for line in (result.path / "rejects.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["reason"] in ("eval_contamination", "eval_contamination_text", "near_duplicate_image"):
            ident = entries[int(row["where"].split()[-1])]["id"]
            found.setdefault(row["reason"], set()).add(ident)
            details[ident] = row["detail"]
    assert found == planted
    for row in summary.planted["copies"] if "near_duplicate_image" in planted else ():
        assert details[row["id"]].startswith("near-identical image of"), details[row["id"]]
    report = json.loads((result.path / "contamination.json").read_text())
    questions = {n: s["questions"] for n, s in report["eval_sets"].items() if s["questions"]}
    images = {n: s["images"] for n, s in report["eval_sets"].items() if s["images"]}
    assert questions == ({"tiny-sqa": {subset: 1}} if "eval_contamination_text" in planted else {})
    if "eval_contamination" in planted:  # the pool image is in GQA, MME and more; the word image in TextVQA
        assert images["tiny-textvqa"] == {subset: 1} and images["tiny-gqa"] == {subset: 1}
        assert set(images) >= {"tiny-gqa", "tiny-mme", "tiny-textvqa"}
    else:
        assert images == {}


def test_a_rejected_image_never_stands_for_the_copy_that_is_dropped(
    samples_root: Path, tmp_path: Path
) -> None:
    """A thumbnail too small for the filters, listed before the full picture: the thumbnail is
    rejected for its size and the picture is kept (it is no near-copy of anything in the build)."""
    root = tmp_path / "root"
    (root / "world" / "images").mkdir(parents=True)
    entries = []
    for ident, image in (
        ("a-thumb", _picture(5).resize((40, 40))),
        ("b-full", _picture(5)),
        ("c-other", _picture(6)),
    ):
        image.save(root / "world" / "images" / f"{ident}.jpg", quality=90)
        turns = [
            {"from": "human", "value": "<image>\nDescribe."},
            {"from": "gpt", "value": f"picture {ident}"},
        ]
        entries.append({"id": ident, "image": f"{ident}.jpg", "conversations": turns})
    (root / "world" / "data.json").write_text(json.dumps(entries))
    extra = "dedup: {image: {max_distance: 16}}\nfilters: {min_image_side: 48}"
    result = build_dataset(_spec(tmp_path, "world-thumb", "image_text", extra), root, fan_out=serial_map)
    assert _rejected(result.path) == {"image_too_small": {"a-thumb"}}
    assert result.manifest["stats"]["totals"]["kept"] == 2


def test_the_write_pass_reuses_the_scans_perceptual_hashes(
    world, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``dedup.image`` and ``decontaminate`` both on, an image the near-identical scan hashed is
    checked against the eval index with that hash: only the scan's rejects (the planted eval images and
    the eval question, whose hashes the scan does not keep) are hashed a second time. Same rejects."""
    import tasks.data.contamination as contamination
    import tasks.data.image_units as image_units

    calls: list[object] = []

    def counting(source, *args, **kwargs):
        calls.append(source)
        return real(source, *args, **kwargs)

    real = image_units.image_phash
    monkeypatch.setattr(image_units, "image_phash", counting)
    monkeypatch.setattr(contamination, "image_phash", counting)
    root, planted = world
    extra = "dedup: {image: {max_distance: 16}, partitions: 4}\ndecontaminate: {max_distance: 16}"
    index = eval_index("tiny", root)
    result = build_dataset(_spec(tmp_path, "world-once", "image_text", extra), root, fan_out=serial_map,
                           eval_index=index)  # fmt: skip
    assert _rejected(result.path) == planted
    images = DISTINCT + 3 + 2 + 1  # every picture, once by the scan
    again = len(planted["eval_contamination"]) + len(planted["eval_contamination_text"])
    assert len(calls) == images + again, len(calls)
