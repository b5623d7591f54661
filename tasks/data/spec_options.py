"""The options of a dataset spec: filters, de-duplication, decontamination and downloads (the
sources and the spec itself are in ``tasks.data.specs``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    """A spec model: unknown fields are errors, attribute docstrings are field descriptions."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)


class Filters(Strict):
    """Sample filters; a sample failing one is rejected with that reason."""

    min_chars: int = Field(default=1, ge=0)
    """Minimum document/caption length in characters after normalisation."""
    max_chars: int = Field(default=1_000_000, gt=0)
    """Maximum document length in characters; longer ones are rejected, never read into a model."""
    min_caption_words: int = Field(default=1, ge=0)
    """Image-text: minimum caption words."""
    max_caption_chars: int = Field(default=1000, gt=0)
    """Image-text and instruct: maximum caption or turn length in characters."""
    min_image_side: int = Field(default=8, gt=0)
    """Minimum image width and height in pixels."""
    max_image_pixels: int = Field(default=50_000_000, gt=0)
    """Maximum width x height (decompression-bomb guard)."""
    max_aspect_ratio: float = Field(default=20.0, ge=1.0)
    """Maximum long side / short side."""
    max_line_bytes: int | None = Field(default=None, gt=0)
    """Longest line of a jsonl or TSV source in bytes; a longer line is rejected as ``oversized_line``
    without being read whole. Default: 12 x ``max_chars`` (jsonl) or ``max_caption_chars`` (TSV) + 1 MiB,
    enough for any record within those limits even when every character is JSON-escaped."""
    max_json_bytes: int = Field(default=2 << 30, gt=0)
    """Largest whole-JSON file (``llava_json`` sources, ``files`` sources with ``format: json``) that is
    loaded into memory; a larger file fails the build with an error naming the file and this field."""


class MinHashDedup(Strict):
    """Near-duplicate text removal by MinHash LSH (word n-gram shingles)."""

    threshold: float = Field(default=0.8, gt=0.0, lt=1.0)
    """Least estimated Jaccard similarity (share of equal MinHash values) of two near-copies."""
    ngram: int = Field(default=5, gt=0)
    """Words per shingle (a document with fewer words is one shingle)."""
    num_perm: int = Field(default=128, gt=0, le=1024)
    """MinHash permutations (signature length)."""
    bands: int = Field(default=16, gt=0)
    """LSH bands: two documents are compared when all rows of one band agree (``num_perm / bands`` rows)."""

    @model_validator(mode="after")
    def _bands_divide(self) -> MinHashDedup:
        if self.num_perm % self.bands:
            raise ValueError(f"bands ({self.bands}) must divide num_perm ({self.num_perm})")
        return self


class ImageDedup(Strict):
    """Near-identical images within an image-text build, by perceptual hash."""

    max_distance: int = Field(default=16, ge=0, le=191)
    """Largest Hamming distance (of 192 phash bits: 8 x 8 per colour channel) between two copies of one
    image. Measured: a resized, re-encoded copy differs in 4-12 bits; distinct pictures in 80 or more."""


class Decontaminate(Strict):
    """Keep evaluation data out of training data: every ``kind: eval`` spec of the same profile."""

    max_distance: int = Field(default=16, ge=0, le=191)
    """Images: a training image within this many phash bits (of 192) of an eval image is rejected
    (``eval_contamination``)."""
    ngram: int = Field(default=13, ge=3)
    """Text: a caption, conversation or document sharing a word n-gram of this length with an eval
    question is rejected (``eval_contamination_text``); shorter questions cannot match."""


class Dedup(Strict):
    """De-duplication settings (partitioned by key over Ray tasks: no process holds every key)."""

    exact: bool = True
    """Drop exact duplicates (sha256 of the normalised text); the first occurrence in source order wins."""
    minhash: MinHashDedup | None = None
    """Text: also drop near-duplicates (reason ``near_duplicate``, naming the kept document); the
    earliest document of a cluster of near-copies is kept."""
    image: ImageDedup | None = None
    """Image-text: near-identical images are kept once (reason ``near_duplicate_image``, naming the
    kept sample). Not for instruct builds, where many conversations rightly share one image."""
    partitions: int = Field(default=16, gt=0, le=65535)
    """Buckets the keys are spread over, one reduce task each (memory per task ~ documents / partitions)."""


class Download(Strict):
    """A published file fetched before the build (LLaVA's json, image archives): no manual step."""

    url: str
    """Its URL (a hub file is ``https://huggingface.co/datasets/<id>/resolve/<revision>/<file>``)."""
    to: str
    """Where it lands, relative to the data root: the file, or the folder an archive is unpacked into."""
    unpack: Literal["none", "zip", "tar"] = "none"
    """``zip`` or ``tar`` (``.tar``, ``.tar.gz``): unpack into ``to`` (members leaving it, links and
    devices refused); ``none``: the file is put at ``to``."""
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    """Expected sha256; without it the publisher's ``<url>.sha256`` is used when there is one."""
