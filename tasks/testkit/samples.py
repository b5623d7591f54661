"""Sample data for the tiny CPU profile, in the formats of the real MobileVLM datasets.

The shape world of the tiny CPU profile's samples (``tasks.testkit.sample_tree.make_samples``
writes them): a small, deterministic world of coloured shapes that a tiny LLaMA
(width 64) with a tiny CLIP ViT (56 px) can learn from: every caption and answer states exactly what
the pixels show, and answers are single lowercase words so exact-match accuracy can be measured.

Layout under ``out_dir`` (all written atomically; ``samples.json`` last, as the manifest):

* ``images/{id}.jpg`` - RGB JPEGs of 1..3 shapes on a pale, softly mottled background, plus
  ``broken_{i}.jpg`` (bytes that are not an image) and ``empty_{i}.jpg`` (zero bytes) for the corrupt
  CC3M rows, and the planted copies of eval and training images (``planted.py``);
* ``redpajama/{subset}.jsonl`` - ``{"text", "meta"}`` lines for the seven RedPajama v1 subsets, with
  a known number of exact duplicates and empty/whitespace-only documents per subset;
* ``cc3m/urls.tsv`` - ``url<TAB>caption`` with URLs ``{LOCAL_SERVER}/images/{id}.jpg`` (good), then
  rows for missing files (404) and for the corrupt files;
* ``llava/pretrain.json`` - LLaVA-Pretrain-558K style caption conversations;
* ``llava/instruct.json`` - LLaVA-Instruct style 1..3-round conversations (colour, shape, count, position,
  existence), a share of questions ending with LLaVA-1.5's short-answer instruction;
* ``sharegpt/chat.json`` - ShareGPT style text-only dialogues about the same world;
* ``eval/`` - tiny replicas of the six benchmarks (GQA, POPE, MME, ScienceQA, TextVQA, MMBench) in
  their published layouts, on images drawn apart from the training images (``eval_samples.py``);
* ``tokenizer/`` - the tiny LLaMA-style tokenizer trained on all of the text above;
* ``samples.json`` - the ``SampleSummary``: counts, seed, config, image metadata, sha256 of every file.
"""

from __future__ import annotations

import io
import json
import logging
import math
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from tasks.data.local_server import LOCAL_SERVER_PLACEHOLDER

logger = logging.getLogger(__name__)

GENERATOR_VERSION = "samples/3"
"""Bump when the bytes written for the same config change."""

RGB = tuple[int, int, int]

PALETTE: dict[str, RGB] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (40, 70, 225),
    "yellow": (245, 215, 30),
    "purple": (135, 50, 185),
    "orange": (245, 130, 20),
}
"""Shape colours, far apart in RGB (and all far from the pale backgrounds)."""

BACKGROUNDS: dict[str, RGB] = {
    "white": (255, 255, 255),
    "light grey": (228, 228, 228),
    "pale blue": (232, 240, 250),
    "pale yellow": (250, 247, 228),
    "pale green": (236, 248, 236),
    "pale pink": (250, 236, 238),
}
"""Plain background colours (pale, so any shape pixel differs from them by far)."""

KINDS: tuple[str, ...] = ("circle", "square", "triangle", "star")
"""Shape kinds that can be drawn."""

POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
"""Regions a shape can occupy; the answer words of position questions."""

POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
"""How captions place a shape."""

COUNT_WORDS: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
)
"""Number words; count answers are ``COUNT_WORDS[n]``."""

REDPAJAMA_SUBSETS: tuple[str, ...] = (
    "arxiv",
    "book",
    "c4",
    "common_crawl",
    "github",
    "stackexchange",
    "wikipedia",
)
"""The seven RedPajama v1 subsets."""

# Layouts: positions of the shapes for each count, and per count the centre (x, y) of each position as
# fractions of the image side, the shape radius and the centre jitter (fractions of the side).
_LAYOUTS: dict[int, tuple[tuple[str, ...], ...]] = {
    1: tuple((p,) for p in POSITIONS),
    2: (("left", "right"), ("top", "bottom")),
    3: (("left", "center", "right"), ("top", "center", "bottom")),
}
_CENTRES: dict[int, dict[str, tuple[float, float]]] = {
    1: {
        "left": (0.25, 0.5),
        "right": (0.75, 0.5),
        "top": (0.5, 0.25),
        "bottom": (0.5, 0.75),
        "center": (0.5, 0.5),
    },
    2: {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75)},
    3: {
        "left": (0.18, 0.5),
        "right": (0.82, 0.5),
        "top": (0.5, 0.18),
        "bottom": (0.5, 0.82),
        "center": (0.5, 0.5),
    },
}
_RADIUS: dict[int, float] = {1: 0.2, 2: 0.17, 3: 0.13}
_JITTER: dict[int, float] = {1: 0.02, 2: 0.02, 3: 0.012}
_SUPERSAMPLE = 4
MOTTLE_GRID = 4
"""Side of the grid of random background offsets (``SampleConfig.mottle``)."""

QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "colour": ("What colour is the shape?", "What colour is the {kind}?"),
    "shape": ("What shape is in the picture?", "Which shape is {colour}?"),
    "count": ("How many shapes are there?",),
    "position": ("Where is the {colour} {kind}?",),
    "exists": ("Is there a {colour} {kind} in the image?",),
}
"""Instruct question wordings per question type (answers: colour, kind, count word, position word,
yes or no)."""

SHORT_ANSWER = "Answer the question using a single word or phrase."
"""The instruction LLaVA-1.5's mixture (and the benchmarks' question files) put after short-answer
questions; a share of instruct questions carry it, as in LLaVA-665K."""
SHORT_ANSWER_SHARE = 0.3
"""Share of instruct questions followed by ``SHORT_ANSWER`` on its own line."""


def exists_question(colour: str, kind: str) -> str:
    """The object-existence question (answered yes or no), as POPE asks it."""
    return QUESTION_TEMPLATES["exists"][0].format(colour=colour, kind=kind)


PRETRAIN_REQUESTS: tuple[str, ...] = (
    "Describe the image briefly.",
    "Write a short caption for this image.",
    "What is shown in the picture?",
    "Give a brief description of the image.",
    "Summarize the visual content of the image.",
)
"""LLaVA-Pretrain style requests (the answer is the caption)."""


@dataclass(frozen=True)
class SampleConfig:
    """What ``make_samples`` generates; the same config always gives the same bytes."""

    seed: int = 0
    """Seed of every random choice (each part draws from its own stream derived from it)."""
    n_images: int = 2400
    """Good images (each one a CC3M row, a pretrain sample and an instruct sample). 2400 is what the tiny
    recipe needs to answer held-out colour and shape questions well above chance (600 was not enough)."""
    image_size: int = 64
    """Side of the square images in pixels (CLIP preprocessing resizes them to 56)."""
    single_shape_fraction: float = 0.5
    """Share of images with exactly one shape (the ones asked the plain colour and shape questions)."""
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
    """Shape colours used, names from ``PALETTE``."""
    kinds: tuple[str, ...] = ("circle", "square", "triangle")
    """Shape kinds used, names from ``KINDS``."""
    jpeg_quality: int = 95
    """JPEG quality of the images (4:4:4 chroma, no metadata)."""
    n_docs_per_subset: int = 60
    """Distinct non-empty documents per RedPajama subset."""
    dup_docs_per_subset: int = 2
    """Extra exact copies of earlier documents per subset (for dedup filters)."""
    empty_docs_per_subset: int = 1
    """Empty or whitespace-only documents per subset (for quality filters)."""
    n_missing_urls: int = 3
    """CC3M rows whose URL points at a file that does not exist (404)."""
    n_corrupt_images: int = 2
    """CC3M rows whose URL points at a file that is not a valid image (random bytes or empty)."""
    instruct_per_image: int = 1
    """Instruct conversations per image, each with its own questions (ids ``{image}-q{k}`` when more
    than one), as LLaVA-665K asks several conversations about one COCO image."""
    n_chats: int = 100
    """ShareGPT text-only dialogues."""
    n_eval_images: int = 96
    """Images of the six benchmark replicas under ``eval/`` (drawn apart from the training images)."""
    vocab_size: int = 1024
    """Tokenizer vocabulary size (the ``tiny-llama`` row uses 1024)."""
    mottle: float = 40.0
    """Amplitude (0-255 scale) of the smooth random colour field under each image's background, its
    own per image as every photo's is: plain backgrounds give hundreds of images one perceptual hash,
    with 40 no two of the default config's images are within 16 bits of each other (0 = plain)."""

    def validate(self) -> None:
        """Raise ValueError for impossible settings."""
        unknown = [c for c in self.colours if c not in PALETTE] + [k for k in self.kinds if k not in KINDS]
        if unknown:
            raise ValueError(
                f"unknown colours/kinds {unknown}; colours: {list(PALETTE)}, kinds: {list(KINDS)}"
            )
        if len(self.colours) < 2 or len(self.kinds) < 2:
            raise ValueError("need at least two colours and two kinds")
        if self.n_images < 1 or self.image_size < 32:
            raise ValueError("need n_images >= 1 and image_size >= 32")
        if not 0.0 <= self.single_shape_fraction <= 1.0:
            raise ValueError(f"single_shape_fraction must be in [0, 1], got {self.single_shape_fraction}")
        if self.n_docs_per_subset < 1 or self.dup_docs_per_subset > self.n_docs_per_subset:
            raise ValueError("need n_docs_per_subset >= 1 and dup_docs_per_subset <= n_docs_per_subset")
        counts = (self.dup_docs_per_subset, self.empty_docs_per_subset, self.n_missing_urls)
        if min(*counts, self.n_corrupt_images, self.n_chats, self.mottle) < 0:
            raise ValueError("counts must not be negative")


@dataclass(frozen=True)
class Shape:
    """One drawn shape."""

    kind: str
    """circle, square, triangle or star."""
    colour: str
    """Colour name from ``PALETTE``."""
    position: str
    """Region name from ``POSITIONS``."""
    box: tuple[int, int, int, int]
    """Pixel bounding box ``(x0, y0, x1, y1)``, x1/y1 exclusive, in the written image."""


@dataclass(frozen=True)
class ImageRecord:
    """Metadata of one good image: what it shows, exactly."""

    id: str
    """Sample id (also the file stem)."""
    file: str
    """Path relative to the samples folder (``images/{id}.jpg``)."""
    background: str
    """Background colour name from ``BACKGROUNDS``."""
    shapes: tuple[Shape, ...]
    """The shapes, in caption order."""
    count: int
    """Number of shapes."""
    caption: str
    """Exact description (the CC3M caption and the pretrain answer)."""


@dataclass(frozen=True)
class SubsetCounts:
    """Lines of one RedPajama subset file."""

    docs: int
    """All lines."""
    unique: int
    """Distinct non-empty documents."""
    duplicates: int
    """Exact copies of an earlier document."""
    empty: int
    """Empty or whitespace-only documents."""
    chars: int
    """Characters of text in all lines."""


@dataclass(frozen=True)
class UrlCounts:
    """Rows of ``cc3m/urls.tsv`` (header not counted)."""

    good: int
    """Rows whose URL serves a valid image."""
    missing: int
    """Rows whose URL answers 404."""
    corrupt: int
    """Rows whose URL serves bytes that are not an image."""
    rows: int
    """All rows."""
    planted: int = 0
    """Rows (after the good ones) whose URL serves a planted image (``SampleSummary.planted``)."""


@dataclass
class SampleSummary:
    """What ``make_samples`` wrote (serialised as ``samples.json``)."""

    generator: str
    """Generator version (``GENERATOR_VERSION``)."""
    seed: int
    """The config's seed."""
    config: dict[str, Any]
    """The ``SampleConfig`` as JSON data."""
    n_images: int
    """Good images."""
    n_single_shape: int
    """Good images with one shape."""
    images: list[ImageRecord]
    """Metadata of every good image, in id order."""
    redpajama: dict[str, SubsetCounts]
    """Line counts per RedPajama subset."""
    cc3m: UrlCounts
    """Row counts of the CC3M URL list."""
    pretrain_samples: int
    """Entries of ``llava/pretrain.json``."""
    instruct_samples: int
    """Entries of ``llava/instruct.json``."""
    instruct_rounds: int
    """Question/answer rounds in ``llava/instruct.json``."""
    instruct_questions: dict[str, int]
    """Rounds per question type (colour, shape, count, position)."""
    chats: int
    """Dialogues in ``sharegpt/chat.json``."""
    chat_turns: int
    """Turns (human + gpt) in ``sharegpt/chat.json``."""
    tokenizer_vocab_size: int
    """Tokens in the trained tokenizer."""
    tokenizer_hash: str
    """``model.tokenizer.tokenizer_hash`` of the trained tokenizer."""
    planted: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    """The planted contamination (``tasks.testkit.planted``): ``eval_images``, ``eval_questions``
    and ``copies``, one row per planted sample with its id and what it copies."""
    files: dict[str, str] = field(default_factory=dict)
    """sha256 of every written file (paths relative to the samples folder), ``samples.json`` excluded."""

    def to_json(self) -> dict[str, Any]:
        """JSON data (key-sorted on write)."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SampleSummary:
        """Rebuild a summary from ``to_json`` data."""
        images = [
            ImageRecord(
                **{**rec, "shapes": tuple(Shape(**{**s, "box": tuple(s["box"])}) for s in rec["shapes"])}
            )
            for rec in data["images"]
        ]
        return cls(
            **{
                **data,
                "images": images,
                "redpajama": {k: SubsetCounts(**v) for k, v in data["redpajama"].items()},
                "cc3m": UrlCounts(**data["cc3m"]),
            }
        )


def config_json(config: SampleConfig) -> dict[str, Any]:
    """A config as JSON data (tuples become lists), as stored in ``samples.json``."""
    return json.loads(json.dumps(asdict(config)))


def part_rng(config: SampleConfig, part: str) -> random.Random:
    """An independent, reproducible random stream for one part of the output."""
    return random.Random(f"{config.seed}:{part}")


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------


def _shape_points(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon vertices of a square, triangle or star of radius ``r`` centred at (cx, cy)."""
    if kind == "square":
        h = r * 0.85
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if kind == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]
    if kind == "star":
        return [
            (cx + rad * math.cos(a), cy + rad * math.sin(a))
            for i in range(10)
            for rad, a in [(r if i % 2 == 0 else r * 0.45, -math.pi / 2 + i * math.pi / 5)]
        ]
    raise ValueError(f"no polygon for kind {kind!r}")


def _shape_bounds(kind: str, cx: float, cy: float, r: float) -> tuple[float, float, float, float]:
    """Exact bounding box of a shape (floats)."""
    if kind == "circle":
        return cx - r, cy - r, cx + r, cy + r
    xs, ys = zip(*_shape_points(kind, cx, cy, r), strict=True)
    return min(xs), min(ys), max(xs), max(ys)


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, fill: RGB) -> None:
    """Draw one filled shape (coordinates already in the drawing's scale)."""
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_shape_points(kind, cx, cy, r), fill=fill)


def render_image(
    shapes: Sequence[tuple[str, str, float, float, float]],
    background: str,
    size: int,
    mottle: Sequence[float] = (),
) -> Image.Image:
    """Render ``(kind, colour, cx, cy, r)`` shapes (pixels) on a background, anti-aliased. ``mottle``:
    ``3 * MOTTLE_GRID**2`` offsets added to the background colour, blown up smoothly (none: plain)."""
    big = size * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUNDS[background])
    if mottle:
        offsets = np.asarray(mottle, dtype=np.float32).reshape(MOTTLE_GRID, MOTTLE_GRID, 3)
        bands = [
            np.asarray(Image.fromarray(offsets[:, :, c]).resize((big, big), Image.Resampling.BICUBIC)) + base
            for c, base in enumerate(BACKGROUNDS[background])
        ]
        image = Image.fromarray(np.clip(np.stack(bands, axis=-1), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for kind, colour, cx, cy, r in shapes:
        s = _SUPERSAMPLE
        _draw_shape(draw, kind, cx * s, cy * s, r * s, PALETTE[colour])
    return image.resize((size, size), Image.Resampling.BOX)


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    """Deterministic JPEG bytes (fixed quality, 4:4:4 chroma, no EXIF, no timestamps)."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, subsampling=0, optimize=False)
    return buffer.getvalue()


def with_articles(text: str) -> str:
    """Turn ``a`` into ``an`` before a vowel (``a orange circle`` -> ``an orange circle``)."""
    return re.sub(r"\b([Aa]) (?=[aeiouAEIOU])", r"\1n ", text)


def caption_for(shapes: Sequence[Shape]) -> str:
    """Exact caption of an image: each shape with its colour and place, or a count for identical shapes."""
    first = shapes[0]
    if len(shapes) > 1 and all((s.kind, s.colour) == (first.kind, first.colour) for s in shapes):
        arrangement = "side by side" if first.position in ("left", "right") else "one above the other"
        return f"{COUNT_WORDS[len(shapes)]} {first.colour} {first.kind}s {arrangement}"
    parts = [with_articles(f"a {s.colour} {s.kind} {POSITION_PHRASES[s.position]}") for s in shapes]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def plan_image(
    index: int, count: int, rng: random.Random, config: SampleConfig
) -> tuple[ImageRecord, Image.Image]:
    """Draw ``count`` shapes for image ``index`` at random and render it."""
    size = config.image_size
    positions = rng.choice(_LAYOUTS[count])
    background = rng.choice(sorted(BACKGROUNDS))
    drawn: list[tuple[str, str, float, float, float]] = []
    shapes: list[Shape] = []
    for position in positions:
        kind, colour = rng.choice(config.kinds), rng.choice(config.colours)
        fx, fy = _CENTRES[count][position]
        jitter = _JITTER[count]
        cx = (fx + rng.uniform(-jitter, jitter)) * size
        cy = (fy + rng.uniform(-jitter, jitter)) * size
        r = _RADIUS[count] * rng.uniform(0.92, 1.05) * size
        x0, y0, x1, y1 = _shape_bounds(kind, cx, cy, r)
        box = (
            max(0, math.floor(x0)),
            max(0, math.floor(y0)),
            min(size, math.ceil(x1)),
            min(size, math.ceil(y1)),
        )
        drawn.append((kind, colour, cx, cy, r))
        shapes.append(Shape(kind=kind, colour=colour, position=position, box=box))
    image_id = f"{index:06d}"
    record = ImageRecord(
        id=image_id,
        file=f"images/{image_id}.jpg",
        background=background,
        shapes=tuple(shapes),
        count=count,
        caption=caption_for(shapes),
    )
    n = 3 * MOTTLE_GRID**2 if config.mottle else 0
    mottle = [rng.uniform(-config.mottle, config.mottle) for _ in range(n)]
    return record, render_image(drawn, background, size, mottle)


def _shape_counts(config: SampleConfig) -> list[int]:
    """Shapes per image in id order: the configured share of single-shape images, interleaved at random."""
    rng = part_rng(config, "image-counts")
    n_single = round(config.n_images * config.single_shape_fraction)
    counts = [1] * n_single + [rng.choice((2, 3)) for _ in range(config.n_images - n_single)]
    rng.shuffle(counts)
    return counts


def _corrupt_files(config: SampleConfig) -> dict[str, bytes]:
    """Names and bytes of the files that look like JPEGs but are not valid images."""
    rng = part_rng(config, "corrupt")
    files = {}
    for i in range(config.n_corrupt_images):
        if i % 2 == 1:
            files[f"empty_{i}.jpg"] = b""
        else:  # a JPEG start-of-image marker followed by noise: not decodable
            files[f"broken_{i}.jpg"] = b"\xff\xd8\xff\xe0" + rng.randbytes(512 + 64 * i)
    return files


def make_images(config: SampleConfig) -> tuple[list[ImageRecord], dict[str, bytes]]:
    """All image records (in id order) and the bytes of every file under ``images/``."""
    rng = part_rng(config, "images")
    records, files = [], {}
    for index, count in enumerate(_shape_counts(config)):
        record, image = plan_image(index, count, rng, config)
        records.append(record)
        files[f"{record.id}.jpg"] = encode_jpeg(image, config.jpeg_quality)
    files.update(_corrupt_files(config))
    return records, files


# --------------------------------------------------------------------------------------------------
# Conversations (LLaVA pretrain / instruct, ShareGPT)
# --------------------------------------------------------------------------------------------------


def _unique_shapes(record: ImageRecord, key: Callable[[Shape], Any]) -> list[Shape]:
    """Shapes whose ``key`` occurs once in the image."""
    counts = Counter(key(s) for s in record.shapes)
    return [s for s in record.shapes if counts[key(s)] == 1]


def question_candidates(record: ImageRecord) -> list[tuple[str, str, str]]:
    """Every (type, question, answer) the image answers unambiguously."""
    if record.count == 1:
        s = record.shapes[0]
        return [
            ("colour", QUESTION_TEMPLATES["colour"][0], s.colour),
            ("shape", QUESTION_TEMPLATES["shape"][0], s.kind),
            ("count", QUESTION_TEMPLATES["count"][0], COUNT_WORDS[1]),
            ("position", QUESTION_TEMPLATES["position"][0].format(colour=s.colour, kind=s.kind), s.position),
        ]
    found = [("count", QUESTION_TEMPLATES["count"][0], COUNT_WORDS[record.count])]
    for s in _unique_shapes(record, lambda s: s.kind):
        found.append(("colour", QUESTION_TEMPLATES["colour"][1].format(kind=s.kind), s.colour))
    for s in _unique_shapes(record, lambda s: s.colour):
        found.append(("shape", QUESTION_TEMPLATES["shape"][1].format(colour=s.colour), s.kind))
    for s in _unique_shapes(record, lambda s: (s.colour, s.kind)):
        question = QUESTION_TEMPLATES["position"][0].format(colour=s.colour, kind=s.kind)
        found.append(("position", question, s.position))
    return found


def _existence_round(record: ImageRecord, rng: random.Random, config: SampleConfig) -> tuple[str, str, str]:
    """An object-existence round: a shape the image has, or one it lacks (half the time one that
    shares a colour or a kind with a shape it has, as POPE's adversarial negatives do)."""
    present = {(s.colour, s.kind) for s in record.shapes}
    if rng.random() < 0.5:
        colour, kind = rng.choice(sorted(present))
        return "exists", exists_question(colour, kind), "yes"
    absent = sorted({(c, k) for c in config.colours for k in config.kinds} - present)
    near = [o for o in absent if any(o[0] == c or o[1] == k for c, k in present)]
    colour, kind = rng.choice(near if near and rng.random() < 0.5 else absent)
    return "exists", exists_question(colour, kind), "no"


def instruct_rounds(
    record: ImageRecord, rng: random.Random, config: SampleConfig
) -> list[tuple[str, str, str]]:
    """1..3 (type, question, answer) rounds; single-shape images always get colour and shape, half
    the images an existence round; a share of questions ends with ``SHORT_ANSWER``."""
    candidates = question_candidates(record)
    if record.count == 1:
        rounds = candidates[:2]
        rng.shuffle(rounds)
        if rng.random() < 0.5:
            rounds.append(rng.choice(candidates[2:]))
    else:
        rounds = rng.sample(candidates, rng.randint(1, min(3, len(candidates))))
    if rng.random() < 0.5:
        rounds = [*rounds[:2], _existence_round(record, rng, config)]
        rng.shuffle(rounds)  # any type may come first, as a benchmark's single question does
    return [(t, f"{q}\n{SHORT_ANSWER}" if rng.random() < SHORT_ANSWER_SHARE else q, a) for t, q, a in rounds]


def turns(pairs: Iterable[tuple[str, str]], image: bool) -> list[dict[str, str]]:
    """LLaVA/ShareGPT ``conversations``; ``<image>\\n`` opens the first human turn when ``image``."""
    turns = []
    for i, (question, answer) in enumerate(pairs):
        value = f"<image>\n{question}" if image and i == 0 else question
        turns += [{"from": "human", "value": value}, {"from": "gpt", "value": answer}]
    return turns


def make_pretrain(records: Sequence[ImageRecord], config: SampleConfig) -> list[dict[str, Any]]:
    """LLaVA-Pretrain-558K style entries: a short request and the exact caption."""
    rng = part_rng(config, "pretrain")
    return [
        {
            "id": r.id,
            "image": f"{r.id}.jpg",
            "conversations": turns([(rng.choice(PRETRAIN_REQUESTS), r.caption)], True),
        }
        for r in records
    ]


def make_instruct(
    records: Sequence[ImageRecord], config: SampleConfig
) -> tuple[list[dict[str, Any]], Counter[str]]:
    """LLaVA-Instruct style entries and the number of rounds per question type."""
    rng = part_rng(config, "instruct")
    entries: list[dict[str, Any]] = []
    types: Counter[str] = Counter()
    for r in records:
        for k in range(config.instruct_per_image):
            rounds = instruct_rounds(r, rng, config)
            types.update(t for t, _, _ in rounds)
            entries.append(
                {
                    "id": r.id if config.instruct_per_image == 1 else f"{r.id}-q{k}",
                    "image": f"{r.id}.jpg",
                    "conversations": turns([(q, a) for _, q, a in rounds], True),
                }
            )
    return entries, types


def classify_question(text: str) -> str | None:
    """The question type (colour, shape, count, position) of an instruct question, or None."""
    question = text.removeprefix("<image>\n").strip().split("\n", 1)[0]
    for kind, templates in QUESTION_TEMPLATES.items():
        for template in templates:
            pattern = re.escape(template).replace(r"\{colour\}", r"\w+").replace(r"\{kind\}", r"\w+")
            if re.fullmatch(pattern, question):
                return kind
    return None


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def jsonl_text(docs: Iterable[dict[str, Any]]) -> str:
    """JSON lines with sorted keys."""
    return "".join(json.dumps(d, sort_keys=True, ensure_ascii=False) + "\n" for d in docs)


def json_text(obj: Any) -> str:
    """Indented, key-sorted JSON text."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def make_urls_tsv(
    records: Sequence[ImageRecord], config: SampleConfig, planted: Sequence[tuple[str, str]] = ()
) -> tuple[str, UrlCounts]:
    """The CC3M-like URL list: good rows, the ``planted`` rows, then 404 rows, then corrupt-file rows."""
    rng = part_rng(config, "cc3m")
    rows = [(f"{LOCAL_SERVER_PLACEHOLDER}/{r.file}", r.caption) for r in records] + list(planted)
    bad = [f"images/missing_{i}.jpg" for i in range(config.n_missing_urls)]
    bad += [f"images/{name}" for name in _corrupt_files(config)]
    for rel in bad:
        shape = Shape(
            rng.choice(config.kinds), rng.choice(config.colours), rng.choice(POSITIONS), (0, 0, 0, 0)
        )
        rows.append((f"{LOCAL_SERVER_PLACEHOLDER}/{rel}", caption_for([shape])))
    counts = UrlCounts(
        good=len(records),
        missing=config.n_missing_urls,
        corrupt=config.n_corrupt_images,
        rows=len(rows),
        planted=len(planted),
    )
    return "url\tcaption\n" + "".join(f"{u}\t{c}\n" for u, c in rows), counts


def tokenizer_corpus(
    docs: Iterable[dict[str, Any]], records: Sequence[ImageRecord], conversations: Iterable[dict[str, Any]]
) -> list[str]:
    """Every generated text (documents, captions, turns) plus the Vicuna system prompt and role tags."""
    from model.conversation import VICUNA_SYSTEM

    texts = [d["text"] for d in docs if d["text"].strip()]
    texts += [r.caption for r in records]
    for entry in conversations:
        texts += [t["value"].removeprefix("<image>\n") for t in entry["conversations"]]
    texts += [VICUNA_SYSTEM, "USER:", "ASSISTANT:", *PRETRAIN_REQUESTS]
    return texts
