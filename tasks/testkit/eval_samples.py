"""Tiny replicas of the papers' six benchmarks, in exactly their published file layouts.

The images are drawn from their own random stream, so none of them is a training image. Each set
asks what the shape world answers exactly: GQA-style short answers, POPE-style object existence
with random / popular / adversarial negatives, MME-style yes/no pairs per image in four perception
subtasks, ScienceQA- and MMBench-style multiple choice (MMBench with its circular copies at
index + k x 1,000,000), TextVQA-style images with a rendered word and its OCR token.
"""

from __future__ import annotations

import base64
import io
import json
import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from tasks.testkit.samples import (
    BACKGROUNDS,
    COUNT_WORDS,
    POSITION_PHRASES,
    POSITIONS,
    SHORT_ANSWER,
    ImageRecord,
    SampleConfig,
    encode_jpeg,
    exists_question,
    plan_image,
    question_candidates,
)

OPTION_LETTERS = "Answer with the option's letter from the given choices directly."
"""The instruction ScienceQA and MMBench questions end with."""
EVAL_BASE_INDEX = 900_000
"""Evaluation image ids start here (training ids start at 0)."""
WORDS = ("cat", "sun", "tree", "book", "lamp", "door", "fish", "moon", "ship", "star", "bell", "kite")
"""Words the TextVQA replica renders."""


def eval_images(config: SampleConfig) -> list[tuple[ImageRecord, Image.Image]]:
    """The evaluation image pool: half single-shape, drawn from a stream training never uses."""
    rng = random.Random(f"{config.seed}:eval-images")
    counts = [1 if i % 2 == 0 else rng.choice((2, 3)) for i in range(config.n_eval_images)]
    return [plan_image(EVAL_BASE_INDEX + i, c, rng, config) for i, c in enumerate(counts)]


def _objects(record: ImageRecord) -> set[tuple[str, str]]:
    return {(s.colour, s.kind) for s in record.shapes}


def _jpeg(image: Image.Image, config: SampleConfig) -> bytes:
    return encode_jpeg(image, config.jpeg_quality)


def _jsonl(rows: Sequence[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode()


def _json(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, indent=1).encode()


def make_gqa(pool, config: SampleConfig) -> dict[str, bytes]:
    """``gqa/``: testdev-balanced style questions (string ids) and the answers file."""
    rng = random.Random(f"{config.seed}:eval-gqa")
    files, questions, answers = {}, [], {}
    for record, image in pool:
        files[f"gqa/images/{record.id}.jpg"] = _jpeg(image, config)
        candidates = question_candidates(record)  # one only when every shape looks alike
        for _, question, answer in rng.sample(candidates, min(2, len(candidates))):
            qid = f"{len(questions) + 201300000}"
            questions.append(
                {
                    "question_id": qid,
                    "image": f"{record.id}.jpg",
                    "category": "default",
                    "text": f"{question}\n{SHORT_ANSWER}",
                }
            )
            answers[qid] = {"question": question, "imageId": record.id, "answer": answer, "isBalanced": True}
    files["gqa/llava_gqa_testdev_balanced.jsonl"] = _jsonl(questions)
    files["gqa/testdev_balanced_questions.json"] = _json(answers)
    return files


def _pope_negative(record: ImageRecord, split: str, pool, rng: random.Random, config: SampleConfig):
    present = _objects(record)
    absent = sorted({(c, k) for c in config.colours for k in config.kinds} - present)
    if split == "random":
        return rng.choice(absent)
    if split == "popular":  # the objects seen most often in the whole pool
        seen = Counter(o for r, _ in pool for o in _objects(r))
        return max(absent, key=lambda o: (seen[o], o))
    near = [o for o in absent if any(o[0] == c or o[1] == k for c, k in present)]  # adversarial
    return rng.choice(near or absent)


def make_pope(pool, config: SampleConfig) -> dict[str, bytes]:
    """``pope/``: LLaVA's question file (ids offset per split) and POPE's three label files."""
    rng = random.Random(f"{config.seed}:eval-pope")
    images = pool[: len(pool) // 2]
    files = {f"pope/val2014/COCO_val2014_{r.id}.jpg": _jpeg(img, config) for r, img in images}
    questions = []
    for offset, split in ((0, "adversarial"), (10_000_000, "random"), (20_000_000, "popular")):
        labels = []
        for record, _ in images:
            positive = rng.choice(sorted(_objects(record)))
            pairs = [(positive, "yes"), (_pope_negative(record, split, pool, rng, config), "no")]
            rng.shuffle(pairs)
            for (colour, kind), label in pairs:
                question, name = exists_question(colour, kind), f"COCO_val2014_{record.id}.jpg"
                labels.append(
                    {"question_id": len(labels) + 1, "image": name, "text": question, "label": label}
                )
                questions.append(
                    {
                        "question_id": offset + len(labels),
                        "image": name,
                        "category": split,
                        "text": f"{question}\n{SHORT_ANSWER}",
                    }
                )
        files[f"pope/coco/coco_pope_{split}.json"] = _jsonl(labels)
    files["pope/llava_pope_test.jsonl"] = _jsonl(questions)
    return files


def _mme_pair(subtask: str, record: ImageRecord, rng: random.Random, config: SampleConfig) -> list[str]:
    shape = record.shapes[0]
    if subtask == "existence":
        other = rng.choice(sorted({(c, k) for c in config.colours for k in config.kinds} - _objects(record)))
        return [
            f"Is there a {shape.colour} {shape.kind} in this image?",
            f"Is there a {other[0]} {other[1]} in this image?",
        ]
    if subtask == "count":
        wrong = record.count + rng.choice((-1, 1)) if record.count > 1 else 2
        return [
            f"Are there {COUNT_WORDS[record.count]} shapes in the image?",
            f"Are there {COUNT_WORDS[wrong]} shapes in the image?",
        ]
    if subtask == "position":
        wrong = rng.choice([p for p in POSITIONS if p != shape.position])
        ask = f"Is the {shape.colour} {shape.kind} at the {{}} of the image?"
        return [ask.format(shape.position), ask.format(wrong)]
    wrong = rng.choice([c for c in config.colours if c != shape.colour])
    return [f"Is the {shape.kind} {shape.colour}?", f"Is the {shape.kind} {wrong}?"]


def make_mme(pool, config: SampleConfig) -> dict[str, bytes]:
    """``mme/``: MME's release folder (flat subtasks: image + same-stem txt) and ``llava_mme.jsonl``."""
    rng = random.Random(f"{config.seed}:eval-mme")
    single = [(r, img) for r, img in pool if r.count == 1]
    files, questions = {}, []
    for subtask in ("existence", "count", "position", "color"):
        for record, image in single[: len(single) // 2] if subtask != "count" else pool[: len(single) // 2]:
            name = f"{subtask}/{record.id}.jpg"
            files[f"mme/MME_Benchmark_release_version/{name}"] = _jpeg(image, config)
            yes, no = _mme_pair(subtask, record, rng, config)
            lines = [f"{yes} Please answer yes or no.\tYes", f"{no} Please answer yes or no.\tNo"]
            if rng.random() < 0.5:
                lines.reverse()
            files[f"mme/MME_Benchmark_release_version/{subtask}/{record.id}.txt"] = (
                "\n".join(lines) + "\n"
            ).encode()
            for line in lines:
                question = line.split(" Please answer", 1)[0]
                questions.append(
                    {
                        "question_id": name,
                        "image": name,
                        "category": subtask,
                        "text": f"{question}\n{SHORT_ANSWER}",
                    }
                )
    files["mme/llava_mme.jsonl"] = _jsonl(questions)
    return files


def _choices(answer: str, universe: Sequence[str], rng: random.Random, n: int) -> list[str]:
    options = [answer, *rng.sample([u for u in universe if u != answer], n - 1)]
    rng.shuffle(options)
    return options


def make_sqa(pool, config: SampleConfig) -> dict[str, bytes]:
    """``sqa/``: ``llava_test_CQM-A.json``, ScienceQA's ``problems.json`` and ``pid_splits.json``."""
    rng = random.Random(f"{config.seed}:eval-sqa")
    files, rows, problems = {}, [], {}
    for n, (record, image) in enumerate(pool):
        pid = str(7000 + n)
        shape = record.shapes[0]
        if n % 6 == 5:  # a text-only question: ScienceQA has them, SQA-IMG leaves them out
            question, answer, universe, image = "Which shape has three sides?", "triangle", config.kinds, None
        elif record.count > 1:
            question = f"What colour is the shape {POSITION_PHRASES[shape.position]}?"
            answer, universe = shape.colour, config.colours
        elif n % 2:
            question, answer, universe = f"What colour is the {shape.kind}?", shape.colour, config.colours
        else:
            question, answer, universe = f"Which shape is {shape.colour}?", shape.kind, config.kinds
        choices = _choices(answer, universe, rng, 3)
        hint = "The picture shows coloured shapes." if n % 3 == 0 else ""
        text = ("<image>\n" if image else "") + (f"Context: {hint}\n" if hint else "") + question
        text += "".join(f"\n{letter}. {c}" for letter, c in zip("ABC", choices, strict=True))
        row = {
            "id": pid,
            "conversations": [
                {"from": "human", "value": text},
                {"from": "gpt", "value": "ABC"[choices.index(answer)]},
            ],
        }
        if image is not None:
            row["image"] = f"{pid}/image.png"
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            files[f"sqa/images/test/{pid}/image.png"] = buffer.getvalue()
        rows.append(row)
        problems[pid] = {
            "question": question,
            "choices": choices,
            "answer": choices.index(answer),
            "hint": hint,
            "image": "image.png" if image else None,
            "split": "test",
            "subject": "natural science",
        }
    files["sqa/llava_test_CQM-A.json"] = _json(rows)
    files["sqa/problems.json"] = _json(problems)
    files["sqa/pid_splits.json"] = _json({"train": [], "val": [], "test": sorted(problems)})
    return files


def _word_image(word: str, background: str, size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=size // 4)
    draw.text((size // 2, size // 2), word.upper(), fill=(20, 20, 20), font=font, anchor="mm")
    return image


def make_textvqa(config: SampleConfig) -> dict[str, bytes]:
    """``textvqa/``: images with one rendered word, LLaVA's OCR-token question file, the annotations."""
    rng = random.Random(f"{config.seed}:eval-textvqa")
    files, questions, data = {}, [], []
    for n in range(config.n_eval_images // 2):
        word, image_id = rng.choice(WORDS), f"{0xA000 + n:016x}"
        image = _word_image(word, rng.choice(sorted(BACKGROUNDS)), config.image_size)
        files[f"textvqa/train_images/{image_id}.jpg"] = _jpeg(image, config)
        question = "What word is written in the image?"
        ocr = word.upper() if n % 4 else f"{word.upper()}, {rng.choice(WORDS).upper()}"
        questions.append(
            {
                "question_id": image_id,
                "image": f"{image_id}.jpg",
                "category": "default",
                "text": f"{question}\nReference OCR token: {ocr}\n{SHORT_ANSWER}",
            }
        )
        answers = [word] * 7 + [word.upper(), f"the {word}", rng.choice(WORDS)]
        data.append(
            {
                "question": question,
                "image_id": image_id,
                "answers": answers,
                "question_id": 50000 + n,
                "set_name": "val",
            }
        )
    files["textvqa/llava_textvqa_val_v051_ocr.jsonl"] = _jsonl(questions)
    files["textvqa/TextVQA_0.5.1_val.json"] = _json(
        {"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": data}
    )
    return files


MMBENCH_COLUMNS = (
    "index",
    "question",
    "hint",
    "A",
    "B",
    "C",
    "D",
    "answer",
    "category",
    "image",
    "source",
    "l2-category",
    "comment",
    "split",
)


def make_mmbench(pool, config: SampleConfig) -> dict[str, bytes]:
    """``mmbench/``: the dev tsv with base64 images and circular copies of every question."""
    rng = random.Random(f"{config.seed}:eval-mmbench")
    base_rows, copies = [], []
    for n, (record, image) in enumerate(pool[: len(pool) // 2]):
        if n % 2 and record.count == 1:
            question, answer, universe = "What colour is the shape?", record.shapes[0].colour, config.colours
            category = "attribute_recognition"
        else:
            question, answer, universe = (
                "How many shapes are there?",
                COUNT_WORDS[record.count],
                COUNT_WORDS[1:5],
            )
            category = "object_counting"
        options = _choices(answer, universe, rng, 4 if n % 3 else 3)
        b64 = base64.b64encode(_jpeg(image, config)).decode()
        hint = "Look at the shapes." if n % 4 == 0 else "nan"
        for k in range(len(options)):
            rotated = options[k:] + options[:k]
            letters = "ABCD"[: len(rotated)]
            row = {
                "index": n + k * 1_000_000,
                "question": question,
                "hint": hint,
                "answer": letters[rotated.index(answer)],
                "category": category,
                "image": b64,
                "source": "tiny",
                "l2-category": "perception",
                "comment": "nan",
                "split": "dev",
            }
            row |= {
                c: (rotated["ABCD".index(c)] if "ABCD".index(c) < len(rotated) else "nan") for c in "ABCD"
            }
            (base_rows if k == 0 else copies).append(row)
    lines = ["\t".join(MMBENCH_COLUMNS)]
    lines += ["\t".join(str(r[c]) for c in MMBENCH_COLUMNS) for r in base_rows + copies]
    return {"mmbench/mmbench_dev_en_20231003.tsv": ("\n".join(lines) + "\n").encode()}


def make_eval_sets(config: SampleConfig) -> dict[str, bytes]:
    """Every file of the six replicas, relative to ``eval/``."""
    pool = eval_images(config)
    files: dict[str, bytes] = {}
    for part in (
        make_gqa(pool, config),
        make_pope(pool, config),
        make_mme(pool, config),
        make_sqa(pool, config),
        make_textvqa(config),
        make_mmbench(pool, config),
    ):
        files |= part
    return files
