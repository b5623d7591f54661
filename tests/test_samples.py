"""Tests of the tiny profile's sample data (tasks/testkit/samples.py)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.conversation import VICUNA_SYSTEM
from model.tokenizer import load_tokenizer, tokenizer_hash
from tasks.core.identity import sha256_file
from tasks.data.signatures import image_phash
from tasks.testkit.sample_tree import make_samples
from tasks.testkit.samples import (
    BACKGROUNDS,
    COUNT_WORDS,
    KINDS,
    PALETTE,
    REDPAJAMA_SUBSETS,
    ImageRecord,
    SampleConfig,
    SampleSummary,
    caption_for,
    classify_question,
)

N = SampleConfig().n_images
SMALL = SampleConfig(n_images=40, n_docs_per_subset=8, n_chats=10)


def _all_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (hidden temp files included, so leftovers would show)."""
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SampleSummary]:
    """The default sample set, generated once for the module."""
    out = tmp_path_factory.mktemp("samples")
    return out, make_samples(out)


def _pixels(path: Path) -> np.ndarray:
    """Decoded RGB pixels as int array (H, W, 3)."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int32)


def _foreground(pixels: np.ndarray, background: str) -> np.ndarray:
    """Mask of pixels clearly different from the background colour: by more than its mottle makes
    them (40 per channel, a little more where the smooth blow-up overshoots), by less than the
    closest shape colour is (yellow on pale yellow: 235)."""
    return np.abs(pixels - np.array(BACKGROUNDS[background])).sum(axis=-1) > 190


def _dominant_colour(pixels: np.ndarray, mask: np.ndarray) -> str:
    """The palette colour nearest to most of the masked pixels."""
    names = list(PALETTE)
    palette = np.array([PALETTE[n] for n in names])
    selected = pixels[mask]
    nearest = np.abs(selected[:, None, :] - palette[None, :, :]).sum(axis=-1).argmin(axis=1)
    return names[Counter(nearest.tolist()).most_common(1)[0][0]]


def _position_of(mask: np.ndarray) -> str:
    """Region of the mask's centroid (single-shape images)."""
    size = mask.shape[0]
    ys, xs = np.nonzero(mask)
    dx, dy = xs.mean() / size - 0.5, ys.mean() / size - 0.5
    if max(abs(dx), abs(dy)) < 0.1:
        return "center"
    if abs(dx) > abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def _kind_of(mask: np.ndarray) -> str:
    """Shape kind from how much of its bounding box it fills and, for pointed shapes, its widest row."""
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
    if fill > 0.855:  # measured on the 2400 default images: square 0.879-1.0, circle 0.719-0.830
        return "square"
    if fill > 0.65:
        return "circle"
    rows = mask[ys.min() : ys.max() + 1].sum(axis=1)
    widest = np.flatnonzero(rows == rows.max()).mean() / len(rows)
    return "triangle" if widest > 0.6 else "star"  # a triangle is widest at its base, a star at its arms


def _expected_answer(record: ImageRecord, question: str) -> str:
    """The answer the metadata gives to an instruct question."""
    kind = classify_question(question)
    words = question.removeprefix("<image>\n").split("\n")[0].rstrip("?").split()
    shapes = record.shapes
    if kind == "exists":
        return "yes" if any((s.colour, s.kind) == (words[3], words[4]) for s in shapes) else "no"
    if kind == "count":
        return COUNT_WORDS[record.count]
    if kind == "colour":
        matching = shapes if words[-1] == "shape" else [s for s in shapes if s.kind == words[-1]]
        assert len(matching) == 1, question
        return matching[0].colour
    if kind == "shape":
        matching = shapes if words[-1] == "picture" else [s for s in shapes if s.colour == words[-1]]
        assert len(matching) == 1, question
        return matching[0].kind
    assert kind == "position", question
    matching = [s for s in shapes if (s.colour, s.kind) == (words[-2], words[-1])]
    assert len(matching) == 1, question
    return matching[0].position


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    make_samples(tmp_path / "a", SMALL)
    make_samples(tmp_path / "b", SMALL)
    make_samples(tmp_path / "c", SampleConfig(**{**SMALL.__dict__, "seed": 1}))
    first, second, other = (_all_hashes(tmp_path / x) for x in "abc")
    assert first == second
    assert first.keys() == other.keys()
    differing = {k for k in first if first[k] != other[k]}
    assert "samples.json" in differing and "llava/instruct.json" in differing
    assert "redpajama/wikipedia.jsonl" in differing and "images/000000.jpg" in differing


def test_rerun_skips_and_repairs(tmp_path: Path) -> None:
    summary = make_samples(tmp_path, SMALL)
    before = _all_hashes(tmp_path)
    stamp = (tmp_path / "llava" / "instruct.json").stat().st_mtime_ns
    assert make_samples(tmp_path, SMALL) == summary
    assert (tmp_path / "llava" / "instruct.json").stat().st_mtime_ns == stamp  # skipped
    (tmp_path / "images" / "000001.jpg").write_bytes(b"tampered")
    (tmp_path / "images" / "stale.jpg").write_bytes(b"left over")
    assert make_samples(tmp_path, SMALL) == summary
    assert _all_hashes(tmp_path) == before


def test_counts_match_summary(samples: tuple[Path, SampleSummary]) -> None:
    root, summary = samples
    config = SampleConfig()
    assert summary.config == json.loads(json.dumps(config.__dict__))
    assert summary.n_images == len(summary.images) == config.n_images
    assert summary.n_single_shape == sum(r.count == 1 for r in summary.images) == N // 2
    assert sorted(summary.redpajama) == sorted(REDPAJAMA_SUBSETS)
    total = 0
    for subset, counts in summary.redpajama.items():
        lines = (root / "redpajama" / f"{subset}.jsonl").read_text().splitlines()
        docs = [json.loads(line) for line in lines]
        assert all(set(d) == {"text", "meta"} and isinstance(d["meta"], dict) for d in docs)
        texts = [d["text"] for d in docs]
        non_empty = [t for t in texts if t.strip()]
        assert counts.docs == len(docs) == config.n_docs_per_subset + 3
        assert counts.empty == len(texts) - len(non_empty) == config.empty_docs_per_subset
        assert counts.unique == len(set(non_empty)) == config.n_docs_per_subset
        assert counts.duplicates == len(non_empty) - len(set(non_empty)) == config.dup_docs_per_subset
        assert counts.chars == sum(map(len, texts))
        total += counts.chars
    assert 150_000 < total < 1_000_000
    assert {t for s in REDPAJAMA_SUBSETS for t in _blank_kinds(root, s)} == {"", " \n\t "}
    planted_images = len(summary.planted["eval_images"]) + len(summary.planted["copies"])
    assert summary.pretrain_samples == len(json.loads((root / "llava/pretrain.json").read_text()))
    assert summary.pretrain_samples == N + planted_images
    instruct = json.loads((root / "llava/instruct.json").read_text())
    assert summary.instruct_samples == len(instruct) == N + len(summary.planted["eval_images"]) + 1
    assert summary.instruct_rounds == sum(len(e["conversations"]) // 2 for e in instruct)
    planted = {row["id"] for rows in summary.planted.values() for row in rows}
    generated = sum(len(e["conversations"]) // 2 for e in instruct if e["id"] not in planted)
    assert sum(summary.instruct_questions.values()) == generated == summary.instruct_rounds - 3
    chats = json.loads((root / "sharegpt/chat.json").read_text())
    assert summary.chats == len(chats) == config.n_chats + 1
    assert summary.chat_turns == sum(len(c["conversations"]) for c in chats)
    assert {k: sha256_file(root / k) for k in summary.files} == summary.files
    listed = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert listed == set(summary.files) | {"samples.json"}


def _blank_kinds(root: Path, subset: str) -> set[str]:
    """The blank texts (empty or whitespace) of one subset file."""
    lines = (root / "redpajama" / f"{subset}.jsonl").read_text().splitlines()
    return {json.loads(line)["text"] for line in lines if not json.loads(line)["text"].strip()}


def test_summary_json_round_trips(samples: tuple[Path, SampleSummary]) -> None:
    root, summary = samples
    assert SampleSummary.from_json(json.loads((root / "samples.json").read_text())) == summary


def test_urls_tsv_rows(samples: tuple[Path, SampleSummary]) -> None:
    root, summary = samples
    lines = (root / "cc3m" / "urls.tsv").read_text().splitlines()
    assert lines[0] == "url\tcaption"
    rows = [line.split("\t") for line in lines[1:]]
    assert all(len(r) == 2 and r[0].startswith("{LOCAL_SERVER}/images/") for r in rows)
    files = [root / r[0].removeprefix("{LOCAL_SERVER}/") for r in rows]
    missing = [f for f in files if not f.exists()]
    corrupt, good = [], []
    for f in (f for f in files if f.exists()):
        try:
            with Image.open(f) as image:
                image.load()
            good.append(f)
        except OSError:
            corrupt.append(f)
    assert (len(good), len(missing), len(corrupt)) == (N + summary.cc3m.planted, 3, 2)
    cc3m = summary.cc3m
    assert (cc3m.good, cc3m.missing, cc3m.corrupt, cc3m.planted) == (N, 3, 2, 4)
    assert summary.cc3m.rows == len(rows)
    assert sorted(f.name for f in corrupt) == ["broken_0.jpg", "empty_1.jpg"]
    assert (root / "images" / "empty_1.jpg").stat().st_size == 0
    captions = {r[0].removeprefix("{LOCAL_SERVER}/"): r[1] for r in rows}
    assert all(captions[rec.file] == rec.caption for rec in summary.images)


def test_captions_and_answers_agree_with_metadata(samples: tuple[Path, SampleSummary]) -> None:
    root, summary = samples
    records = {r.id: r for r in summary.images}
    planted = {row["id"] for rows in summary.planted.values() for row in rows}
    assert all(caption_for(r.shapes) == r.caption and r.count == len(r.shapes) for r in records.values())
    for entry in json.loads((root / "llava/pretrain.json").read_text()):
        if entry["id"] not in planted:
            assert entry["conversations"][1]["value"] == records[entry["id"]].caption
    answers: Counter[str] = Counter()
    for entry in json.loads((root / "llava/instruct.json").read_text()):
        if entry["id"] in planted:
            continue
        turns = entry["conversations"]
        for question, answer in zip(turns[::2], turns[1::2], strict=True):
            assert answer["value"] == _expected_answer(records[entry["id"]], question["value"])
            answers[classify_question(question["value"])] += 1
    assert dict(answers) == summary.instruct_questions


def test_colour_and_shape_questions_are_plentiful_and_balanced(samples: tuple[Path, SampleSummary]) -> None:
    _, summary = samples
    config = SampleConfig()
    assert summary.instruct_questions["colour"] >= N // 2 and summary.instruct_questions["shape"] >= N // 2
    assert summary.instruct_questions["count"] > 50 and summary.instruct_questions["position"] > 50
    single = [r.shapes[0] for r in summary.images if r.count == 1]
    colours, kinds = Counter(s.colour for s in single), Counter(s.kind for s in single)
    assert set(colours) == set(config.colours) and set(kinds) == set(config.kinds)
    # no class is so frequent that always answering it would look like learning
    assert max(colours.values()) / len(single) < 2.0 / len(config.colours)
    assert max(kinds.values()) / len(single) < 1.6 / len(config.kinds)
    assert {s.position for s in single} == {"left", "right", "top", "bottom", "center"}


def _check_single_shape_pixels(root: Path, summary: SampleSummary) -> None:
    """Colour, position, kind and box of every single-shape image, measured on the decoded JPEG."""
    for record in (r for r in summary.images if r.count == 1):
        pixels = _pixels(root / record.file)
        assert pixels.shape == (64, 64, 3)
        mask = _foreground(pixels, record.background)
        shape = record.shapes[0]
        assert mask.sum() > 150, record  # visible: > 150 of 4096 pixels
        assert _dominant_colour(pixels, mask) == shape.colour, record
        assert _position_of(mask) == shape.position, record
        assert _kind_of(mask) == shape.kind, record
        ys, xs = np.nonzero(mask)
        x0, y0, x1, y1 = shape.box
        assert abs(xs.min() - x0) <= 2 and abs(xs.max() + 1 - x1) <= 2, record
        assert abs(ys.min() - y0) <= 2 and abs(ys.max() + 1 - y1) <= 2, record


def test_pixels_agree_with_single_shape_metadata(samples: tuple[Path, SampleSummary]) -> None:
    _check_single_shape_pixels(*samples)


def test_stars_and_all_colours_are_drawn_as_stated(tmp_path: Path) -> None:
    config = SampleConfig(seed=5, n_images=80, single_shape_fraction=1.0, kinds=KINDS, n_docs_per_subset=8)
    summary = make_samples(tmp_path, config)
    assert {r.shapes[0].kind for r in summary.images} == set(KINDS)
    _check_single_shape_pixels(tmp_path, summary)


def test_pixels_agree_with_multi_shape_metadata(samples: tuple[Path, SampleSummary]) -> None:
    root, summary = samples
    for record in (r for r in summary.images if r.count > 1):
        pixels = _pixels(root / record.file)
        mask = _foreground(pixels, record.background)
        covered = np.zeros_like(mask)
        for shape in record.shapes:
            x0, y0, x1, y1 = shape.box
            inside = np.zeros_like(mask)
            inside[y0:y1, x0:x1] = True
            assert (mask & inside).sum() > 40, record
            assert _dominant_colour(pixels, mask & inside) == shape.colour, record
            assert not (covered & inside).any(), f"overlapping shapes in {record}"
            covered |= inside
        assert (mask & ~covered).sum() <= 4, record  # nothing drawn outside the listed shapes


def test_instruct_is_llava_format(samples: tuple[Path, SampleSummary]) -> None:
    root, summary = samples
    planted = {row["id"] for rows in summary.planted.values() for row in rows}
    for name in ("pretrain", "instruct"):
        entries = json.loads((root / "llava" / f"{name}.json").read_text())
        for entry in entries:
            assert set(entry) == {"id", "image", "conversations"}
            assert (root / "images" / entry["image"]).is_file()
            turns = entry["conversations"]
            assert 2 <= len(turns) <= 6 and len(turns) % 2 == 0
            assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
            assert turns[0]["value"].startswith("<image>\n")
            assert sum("<image>" in t["value"] for t in turns) == 1
            if name == "instruct" and entry["id"] not in planted:
                assert all(classify_question(t["value"]) for t in turns[::2])
                assert all(a["value"].isalpha() and a["value"].islower() for a in turns[1::2])


def test_sharegpt_is_text_only_multi_turn(samples: tuple[Path, SampleSummary]) -> None:
    root, _ = samples
    chats = json.loads((root / "sharegpt/chat.json").read_text())
    assert len({c["id"] for c in chats}) == len(chats)
    for chat in chats:
        turns = chat["conversations"]
        assert turns and len(turns) % 2 == 0
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert not any("<image>" in t["value"] for t in turns)
    assert max(len(c["conversations"]) for c in chats) > 2


def test_tokenizer_vocab_and_round_trip(samples: tuple[Path, SampleSummary]) -> None:
    root, summary = samples
    tokenizer = load_tokenizer(root / "tokenizer")
    assert len(tokenizer) == 1024 == summary.tokenizer_vocab_size
    assert tokenizer_hash(root / "tokenizer") == summary.tokenizer_hash
    doc = json.loads((root / "redpajama" / "github.jsonl").read_text().splitlines()[0])["text"]
    for text in (summary.images[0].caption, VICUNA_SYSTEM, "USER: What colour is the shape? ASSISTANT:", doc):
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # the world's words are single tokens: the vocabulary was learned on this data
    for word in ("red", "circle", "triangle", "colour", "left"):
        assert len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) == 1


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="unknown"):
        SampleConfig(colours=("red", "magenta")).validate()
    with pytest.raises(ValueError):
        SampleConfig(single_shape_fraction=1.5).validate()


def test_several_instruct_conversations_per_image_have_their_own_ids_and_questions() -> None:
    from tasks.testkit.samples import make_images, make_instruct

    config = SampleConfig(n_images=10, instruct_per_image=3)
    records, _ = make_images(config)
    entries, _ = make_instruct(records, config)
    assert len(entries) == 30 and len({e["id"] for e in entries}) == 30
    assert [e["image"] for e in entries[:3]] == [f"{records[0].id}.jpg"] * 3
    single, _ = make_instruct(records, SampleConfig(n_images=10))
    assert [e["id"] for e in single] == [r.id for r in records]  # the default keeps one per image, as before


def test_only_the_planted_images_look_alike(samples: tuple[Path, SampleSummary]) -> None:
    """Every generated image is more than 16 phash bits from every other one and from every eval
    image (the mottled backgrounds); the planted copies are within 16 bits of what they copy."""
    root, summary = samples
    names = [f"{r.id}.jpg" for r in summary.images]
    names += [f"{row['id']}.jpg" for row in summary.planted["eval_images"] + summary.planted["copies"]]
    train = np.array([image_phash(root / "images" / n) for n in names], dtype=np.uint64)
    eval_files = sorted(p for p in (root / "eval").rglob("*") if p.suffix in (".jpg", ".png"))
    evals = np.array([image_phash(p) for p in eval_files], dtype=np.uint64)
    bits = np.unpackbits(np.concatenate([train, evals]).view(np.uint8), axis=1).astype(np.int16)
    near: set[tuple[str, str]] = set()
    labels = names + [p.relative_to(root / "eval").as_posix() for p in eval_files]
    for i in range(len(names)):
        distance = (bits[i + 1 :] != bits[i]).sum(axis=1)
        near |= {(labels[i], labels[i + 1 + j]) for j in np.flatnonzero(distance <= 16)}
    expected = {(f"{row['of']}.jpg", f"{row['id']}.jpg") for row in summary.planted["copies"]}
    found_eval = {b for a, b in near if a.startswith("plant_")}
    near_train = {(a, b) for a, b in near if not a.startswith("plant_")}
    assert near_train == expected, near_train
    assert {row["eval_file"] for row in summary.planted["eval_images"]} <= found_eval
    assert all(f.startswith(("gqa/", "pope/", "mme/", "sqa/", "mmbench/", "textvqa/")) for f in found_eval)
