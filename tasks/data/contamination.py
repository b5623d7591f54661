"""Eval decontamination: training samples that show an evaluation image or contain an eval question.

``EvalIndex`` holds the perceptual hashes of every image and the word n-gram hashes of every question
of the ``kind: eval`` specs of a profile (``tasks.quality.eval_index`` builds it; the build gets it
through ``build_dataset(eval_index=...)`` and its digest is part of the build identity). Builders ask
``image_match`` and ``text_match``; a hit becomes a reject (``eval_contamination``,
``eval_contamination_text``) whose detail starts with the names of the eval sets it is found in,
and ``write_report`` turns a build's rejects into ``contamination.json`` (per eval set: images and
questions found, by source).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from tasks.core.identity import atomic_write_json, hash_json
from tasks.data.dedup import NearRule, band_keys
from tasks.data.signatures import PHASH_BITS, hamming, image_phash, ngram_hashes

log = logging.getLogger(__name__)

IMAGE_REASON = "eval_contamination"
TEXT_REASON = "eval_contamination_text"


@dataclass(frozen=True)
class EvalImage:
    """One evaluation image."""

    eval_set: str
    """Eval spec name."""
    item: str
    """Question id whose image it is."""
    phash: tuple[int, ...]
    """``image_phash`` words."""


@dataclass(frozen=True)
class EvalIndex:
    """What training data must not contain (picklable for Ray workers)."""

    images: tuple[EvalImage, ...]
    """Every eval image, once per (set, image)."""
    ngrams: dict[int, tuple[str, str]]
    """n-gram hash -> (eval set, question id) of the first question holding it."""
    ngram: int
    """Words per n-gram."""
    sets: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per eval set: ``images`` (hashed), ``unhashed_images`` (do not decode: not checked),
    ``questions`` and ``short_questions`` (fewer words than ``ngram``: they cannot be matched)."""
    missing: tuple[str, ...] = ()
    """Eval specs of the profile whose files are not on disk (not checked; named in the report)."""

    @cached_property
    def digest(self) -> str:
        """Identity of the index (part of every build that uses it)."""
        images = sorted((i.eval_set, i.item, i.phash) for i in self.images)
        ngrams = sorted((gram, *where) for gram, where in self.ngrams.items())
        body = {
            "images": images,
            "ngrams": ngrams,
            "n": self.ngram,
            "sets": self.sets,
            "missing": self.missing,
        }
        return hash_json(body)

    def _buckets(self, max_distance: int) -> tuple[NearRule, dict[tuple[int, int], list[int]]]:
        rule = NearRule("phash", max_distance + 1, max_distance, IMAGE_REASON)
        table: dict[tuple[int, int], list[int]] = defaultdict(list)
        if self.images:
            keys = band_keys(np.array([i.phash for i in self.images], dtype=np.uint64), rule)
            for n, row in enumerate(keys):
                for band, key in enumerate(row):
                    table[(band, int(key))].append(n)
        return rule, table

    def image_match(self, phash: np.ndarray, max_distance: int) -> tuple[tuple[EvalImage, ...], int] | None:
        """Every eval set's closest image within ``max_distance`` bits of ``phash`` (by set name) and
        the smallest distance, or None when no eval image is that close."""
        cache = self.__dict__.setdefault("_tables", {})
        if max_distance not in cache:
            cache[max_distance] = self._buckets(max_distance)
        rule, table = cache[max_distance]
        candidates = {
            n
            for band, key in enumerate(band_keys(phash[None, :], rule)[0])
            for n in table.get((band, int(key)), ())
        }
        closest: dict[str, tuple[int, int]] = {}
        for n in sorted(candidates):
            distance = hamming(phash, np.array(self.images[n].phash, np.uint64))
            name = self.images[n].eval_set
            if distance <= max_distance and (name not in closest or distance < closest[name][0]):
                closest[name] = (distance, n)
        if not closest:
            return None
        best = min(d for d, _ in closest.values())
        return tuple(self.images[closest[name][1]] for name in sorted(closest)), best

    def text_match(self, text: str) -> tuple[str, str] | None:
        """(eval set, question id) of an eval question sharing an n-gram with ``text``, or None."""
        found = ngram_hashes(text, self.ngram)
        if self.ngrams.keys().isdisjoint(found):
            return None
        return self.ngrams[min(found & self.ngrams.keys())]


def image_detail(hit: tuple[tuple[EvalImage, ...], int]) -> str:
    """Reject detail of a contaminated image (starts with the names of the eval sets that show it)."""
    images, distance = hit
    sets = ", ".join(i.eval_set for i in images)
    items = ", ".join(f"{i.eval_set} {i.item}" for i in images)
    return f"{sets}: the image of question {items} ({distance} of {PHASH_BITS} phash bits differ)"


def text_detail(hit: tuple[str, str], n: int) -> str:
    """Reject detail of a text sharing an n-gram with an eval question."""
    return f"{hit[0]}: shares a {n}-word sequence with question {hit[1]}"


def write_report(out: Path, index: EvalIndex, rejects: list[dict[str, Any]]) -> dict[str, Any]:
    """``contamination.json``: per eval set, the images and questions found, by subset."""
    report: dict[str, Any] = {
        name: {"checked": counts, "images": {}, "questions": {}}
        for name, counts in sorted(index.sets.items())
    }
    for row in rejects:
        kind = {IMAGE_REASON: "images", TEXT_REASON: "questions"}.get(row["reason"])
        if kind is None:
            continue
        for eval_set in row["detail"].split(":", 1)[0].split(", "):
            found = report.setdefault(eval_set, {"checked": {}, "images": {}, "questions": {}})[kind]
            found[row["subset"]] = found.get(row["subset"], 0) + 1
    body = {
        "eval_sets": report,
        "ngram": index.ngram,
        "not_checked": list(index.missing),
        "index": index.digest,
    }
    atomic_write_json(out / "contamination.json", body)
    return body


def check_sample(ctx: Any, image: str | Path | bytes | None, texts: list[str]) -> tuple[str, str] | None:
    """(reason, detail) when a training sample shows an eval image or holds an eval question, else
    None (also when the build's spec does not ask for decontamination). ``ctx`` is the BuildContext;
    ``image`` is one the builder has checked already (header sizes, decode)."""
    if ctx.spec.decontaminate is None or ctx.eval_index is None:
        return None
    phash = None
    if image is not None:
        try:
            phash = image_phash(image)
        except Exception as err:  # an image that does not hash is the builder's reject, not ours
            log.debug("image does not hash: %s: %s", type(err).__name__, err)
    return check_signature(ctx, phash, texts)


def check_signature(ctx: Any, phash: np.ndarray | None, texts: list[str]) -> tuple[str, str] | None:
    """``check_sample`` for an image whose ``image_phash`` is known already (or None: no image)."""
    rule, index = ctx.spec.decontaminate, ctx.eval_index
    if rule is None or index is None:
        return None
    if phash is not None and (hit := index.image_match(phash, rule.max_distance)) is not None:
        return IMAGE_REASON, image_detail(hit)
    for text in texts:
        if (found := index.text_match(text)) is not None:
            return TEXT_REASON, text_detail(found, index.ngram)
    return None
