"""The eval index of a profile: what decontaminated builds keep out of training data.

Every ``kind: eval`` spec of the profile is fetched (its ``downloads``, as an evaluation does) and
read whole (its ``limit`` does not apply: a question left out of a quick evaluation may be asked in
a later one); each distinct image is hashed (``image_phash``) and each question (without the
benchmark's instruction) is cut into word n-grams. A spec whose files cannot be had is named in the
index (``missing``) and in every report, and a WARNING says so: it was not checked.
"""

from __future__ import annotations

import base64
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.data.contamination import EvalImage, EvalIndex
from tasks.data.signatures import image_phash, ngram_hashes
from tasks.quality.eval_sets import EvalSetError, read_eval_set
from tasks.quality.eval_specs import load_eval_specs

if TYPE_CHECKING:
    from tasks.data.build import BuildResult
    from tasks.data.specs import DatasetSpec

log = logging.getLogger(__name__)


def eval_index(
    profile: str, data_root: str | Path, ngram: int = 13, spec_dir: str | Path | None = None
) -> EvalIndex:
    """The index of every eval spec of ``profile`` (tiny or real) found under ``data_root``."""
    images: list[EvalImage] = []
    grams: dict[int, tuple[str, str]] = {}
    sets: dict[str, dict[str, int]] = {}
    missing: list[str] = []
    for name, (_, spec) in sorted(load_eval_specs(spec_dir).items()):
        if spec.profile != profile:
            continue
        try:
            from tasks.quality.harness import fetched  # here: the harness imports the answerers (torch)

            items = read_eval_set(
                fetched(spec, Path(data_root)).model_copy(update={"limit": None}), data_root
            ).items
        except EvalSetError as err:
            log.warning("decontamination: eval set %s is not checked: %s", name, err)
            missing.append(name)
            continue
        seen: set[str] = set()
        short = unhashed = 0
        for item in items:
            if item.image and item.image not in seen:
                seen.add(item.image)
                try:
                    phash = image_phash(_image_source(item.image))
                except Exception as err:  # counted and named: such an image is not checked
                    log.debug("%s: image %s does not hash: %s", name, item.image[:80], err)
                    unhashed += 1
                    continue
                images.append(EvalImage(name, str(item.question_id), tuple(int(w) for w in phash)))
            question = item.prompt.removesuffix(spec.instruction).strip()
            found = ngram_hashes(question, ngram)
            short += not found
            for gram in found:
                grams.setdefault(gram, (name, str(item.question_id)))
        if unhashed:
            log.warning(
                "decontamination: %d image(s) of eval set %s do not decode and are not checked",
                unhashed,
                name,
            )
        sets[name] = {"images": len(seen) - unhashed, "unhashed_images": unhashed, "questions": len(items),
                      "short_questions": short}  # fmt: skip
    return EvalIndex(tuple(images), grams, ngram, sets, tuple(missing))


def index_for(spec: DatasetSpec, data_root: str | Path) -> EvalIndex | None:
    """The eval index a build of ``spec`` needs (None when it does not ask for decontamination)."""
    if spec.decontaminate is None:
        return None
    return eval_index(spec.profile, data_root, spec.decontaminate.ngram)


def build_decontaminated(spec_path: str | Path, data_root: str | Path, **options: Any) -> BuildResult:
    """``build_dataset`` with the eval index its spec asks for (what ``mvlm data build`` runs)."""
    from tasks.data.build import build_dataset
    from tasks.data.specs import load_spec

    index = index_for(load_spec(spec_path), data_root)
    return build_dataset(spec_path, data_root, eval_index=index, **options)


def _image_source(ref: str) -> str | bytes:
    return base64.b64decode(ref[len("base64:") :]) if ref.startswith("base64:") else ref
