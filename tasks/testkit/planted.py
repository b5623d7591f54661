"""Planted contamination: the few training samples of the tiny profile that builds must find.

``make_samples`` adds them to the training sources and lists them in ``SampleSummary.planted``, so a
test can check that a decontaminated build rejects exactly these and nothing else:

* ``eval_images``: re-encoded, resized copies of evaluation images (one of the shared GQA/MME/POPE
  pool, one TextVQA word image), each as a pretrain entry, an instruct entry and a CC3M row
  (``eval_contamination``);
* ``eval_questions``: a ScienceQA question quoted in an instruct conversation and in a ShareGPT
  dialogue (``eval_contamination_text``);
* ``copies``: re-encoded, resized copies of training images, as pretrain entries and CC3M rows
  (``near_duplicate_image`` where a spec asks for ``dedup.image``).

Every other image of the shape world is at least 17 phash bits from every other image and from every
eval image (``SampleConfig.mottle``), and no other training text shares 13 words with a question.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from tasks.data.local_server import LOCAL_SERVER_PLACEHOLDER
from tasks.testkit.samples import ImageRecord, encode_jpeg

EVAL_IMAGE_FOLDERS = ("gqa/images/", "textvqa/train_images/")
"""The first image under each of these eval folders is planted."""
QUESTION_FILE = "sqa/llava_test_CQM-A.json"
"""The planted question is the first of this file with at least ``QUESTION_WORDS`` words."""
QUESTION_WORDS = 16
"""Words of the planted question (more than the 13 of the n-gram check)."""
COPIED = (7, 8)
"""Training images (by index) that get a near-identical copy."""
PLANT_SIZE = 72
"""Side in pixels of the planted images (resized, then re-encoded at ``PLANT_QUALITY``)."""
PLANT_QUALITY = 80
"""JPEG quality of the planted images."""


@dataclass
class Plants:
    """What ``plant`` adds to the training sources."""

    files: dict[str, bytes] = field(default_factory=dict)
    """New files under ``images/``."""
    pretrain: list[dict[str, Any]] = field(default_factory=list)
    """Entries appended to ``llava/pretrain.json``."""
    instruct: list[dict[str, Any]] = field(default_factory=list)
    """Entries appended to ``llava/instruct.json``."""
    chats: list[dict[str, Any]] = field(default_factory=list)
    """Dialogues appended to ``sharegpt/chat.json``."""
    url_rows: list[tuple[str, str]] = field(default_factory=list)
    """``(url, caption)`` rows appended to ``cc3m/urls.tsv``."""
    summary: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    """``SampleSummary.planted``: ``eval_images``, ``eval_questions`` and ``copies``, one row each."""


def _reencoded(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as image:
        small = image.convert("RGB").resize((PLANT_SIZE, PLANT_SIZE), Image.Resampling.BICUBIC)
    return encode_jpeg(small, PLANT_QUALITY)


def _entry(ident: str, image: str | None, pairs: Sequence[tuple[str, str]]) -> dict[str, Any]:
    turns = []
    for k, (question, answer) in enumerate(pairs):
        prefix = "<image>\n" if image is not None and k == 0 else ""
        turns += [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]
    return {"id": ident, **({"image": image} if image else {}), "conversations": turns}


def _add_image(plants: Plants, ident: str, data: bytes, caption: str, instruct: bool) -> None:
    plants.files[f"{ident}.jpg"] = _reencoded(data)
    plants.pretrain.append(_entry(ident, f"{ident}.jpg", [("Describe the image briefly.", caption)]))
    if instruct:
        plants.instruct.append(_entry(ident, f"{ident}.jpg", [("What is in the picture?", caption)]))
    plants.url_rows.append((f"{LOCAL_SERVER_PLACEHOLDER}/images/{ident}.jpg", caption))


def _question(eval_files: dict[str, bytes]) -> tuple[str, str, str]:
    """(question id, question text without the image token, answer) of the planted question."""
    for item in json.loads(eval_files[QUESTION_FILE]):
        human, gpt = item["conversations"][0]["value"], item["conversations"][1]["value"]
        text = human.replace("<image>", "").strip()
        if len(text.split()) >= QUESTION_WORDS:
            return str(item["id"]), text, gpt
    raise ValueError(f"{QUESTION_FILE} has no question of {QUESTION_WORDS} words to plant")


def plant(
    records: Sequence[ImageRecord], image_files: dict[str, bytes], eval_files: dict[str, bytes]
) -> Plants:
    """The planted samples for these training images and eval files (deterministic)."""
    plants = Plants(summary={"eval_images": [], "eval_questions": [], "copies": []})
    for n, folder in enumerate(EVAL_IMAGE_FOLDERS):
        name = min(p for p in eval_files if p.startswith(folder) and p.endswith(".jpg"))
        ident = f"plant_{n}"
        _add_image(plants, ident, eval_files[name], "a picture from somewhere else", instruct=True)
        plants.summary["eval_images"].append({"id": ident, "eval_file": name})
    for index in COPIED:
        record = records[index]
        ident = f"{record.id}_copy"
        _add_image(plants, ident, image_files[f"{record.id}.jpg"], record.caption, instruct=False)
        plants.summary["copies"].append({"id": ident, "of": record.id})
    qid, text, answer = _question(eval_files)
    ask = f"A quiz I found online asks this:\n{text}"
    plants.instruct.append(_entry("plant_q0", f"{records[0].id}.jpg", [(ask, answer)]))
    plants.chats.append(_entry("sg_plant_0", None, [(ask, f"The answer is {answer}.")]))
    for ident, source in (("plant_q0", "llava/instruct.json"), ("sg_plant_0", "sharegpt/chat.json")):
        plants.summary["eval_questions"].append(
            {"id": ident, "source": source, "eval_file": QUESTION_FILE, "question": qid}
        )
    return plants
