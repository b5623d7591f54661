"""Evaluation sets: the six tiny eval_replicas read in the published layouts, and bad files refused or
counted, never scored silently."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tasks.quality.eval_files import EvalSetError
from tasks.quality.eval_sets import read_eval_set
from tasks.quality.eval_specs import EvalSpecError, find_eval_spec, load_eval_specs, parse_eval_spec
from tasks.testkit.samples import SampleConfig

EXPECTED = {"tiny-gqa": 192, "tiny-mmbench": 176, "tiny-mme": 192, "tiny-pope": 288, "tiny-sqa": 96,
            "tiny-textvqa": 48}  # fmt: skip
"""Questions of each replica (from make_eval_sets' plan: 96 evaluation images)."""


@pytest.fixture
def root(eval_replicas: Path, tmp_path: Path) -> Path:
    """A private copy of the eval_replicas a test may break."""
    shutil.copytree(eval_replicas, tmp_path / "root", symlinks=True)
    return tmp_path / "root"


def _spec(name: str, **changes):
    spec = find_eval_spec(name)[1]
    return spec.model_copy(update=changes) if changes else spec


def _edit_jsonl(path: Path, edit) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(r) + "\n" for r in edit(rows)))


def test_every_eval_spec_file_is_valid_and_the_tiny_profile_has_all_six_benchmarks() -> None:
    specs = load_eval_specs()
    tiny = {spec.benchmark for _, spec in specs.values() if spec.profile == "tiny"}
    assert tiny == {"gqa", "sqa", "textvqa", "pope", "mme", "mmbench"}
    real = {spec.benchmark for _, spec in specs.values() if spec.profile == "real"}
    assert real == tiny, "each benchmark has a real-profile spec naming its public files"
    for _, spec in specs.values():
        if spec.profile == "real":
            assert spec.downloads, f"{spec.name} names where its files come from"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_replica_reads_in_full_with_no_rejects(eval_replicas: Path, name: str) -> None:
    eval_set = read_eval_set(_spec(name), eval_replicas)
    assert len(eval_set.items) == EXPECTED[name]
    assert eval_set.rejects.items == []
    assert len({item.key for item in eval_set.items}) == len(eval_set.items)
    assert all(eval_set.spec.instruction in item.prompt for item in eval_set.items)


def test_replica_content_follows_the_benchmarks(eval_replicas: Path) -> None:
    pope = read_eval_set(_spec("tiny-pope"), eval_replicas).items
    assert {i.group["split"] for i in pope} == {"adversarial", "popular", "random"}
    assert sum(i.truth == "yes" for i in pope) == len(pope) // 2  # POPE is balanced
    mme = read_eval_set(_spec("tiny-mme"), eval_replicas).items
    per_image: dict[str, set[str]] = {}
    for item in mme:
        per_image.setdefault(item.group["image"], set()).add(item.truth)
    assert all(truths == {"yes", "no"} for truths in per_image.values()), "MME pairs a yes and a no per image"
    mmbench = read_eval_set(_spec("tiny-mmbench"), eval_replicas).items
    bases: dict[str, list[str]] = {}
    for item in mmbench:
        bases.setdefault(item.group["base"], []).append(item.options[item.truth])
    assert all(len(set(answers)) == 1 and len(answers) >= 3 for answers in bases.values()), (
        "every circular copy has the same right option text"
    )
    textvqa = read_eval_set(_spec("tiny-textvqa"), eval_replicas).items
    assert all("Reference OCR token:" in i.prompt for i in textvqa)


def test_limit_keeps_whole_mme_images_and_mmbench_rotations(eval_replicas: Path) -> None:
    mme = read_eval_set(_spec("tiny-mme", limit=5), eval_replicas).items
    assert len({i.group["image"] for i in mme}) == 5 and len(mme) == 10
    mmbench = read_eval_set(_spec("tiny-mmbench", limit=3), eval_replicas).items
    assert len({i.group["base"] for i in mmbench}) == 3
    assert all(len(i.options) == sum(j.group["base"] == i.group["base"] for j in mmbench) for i in mmbench)


def test_a_missing_image_is_a_counted_reject_that_fails_the_set_by_default(root: Path) -> None:
    images = sorted((root / "samples/eval/gqa/images").iterdir())
    images[0].unlink()
    with pytest.raises(EvalSetError) as err:
        read_eval_set(_spec("tiny-gqa"), root)
    assert "2 of 192 questions cannot be asked" in str(err.value)
    assert "missing_image" in str(err.value) and images[0].name in str(err.value)
    tolerant = read_eval_set(_spec("tiny-gqa", max_failure_ratio=0.05), root)
    assert len(tolerant.items) == 190 and tolerant.rejects.counts() == {"missing_image": 2}


def test_an_unknown_option_letter_is_a_counted_reject(root: Path) -> None:
    tsv = root / "samples/eval/mmbench/mmbench_dev_en_20231003.tsv"
    lines = tsv.read_text().splitlines()
    header = lines[0].split("\t")
    row = lines[1].split("\t")
    row[header.index("answer")] = "E"
    tsv.write_text("\n".join([lines[0], "\t".join(row), *lines[2:]]) + "\n")
    spec = _spec("tiny-mmbench", max_failure_ratio=0.05)
    eval_set = read_eval_set(spec, root)
    assert eval_set.rejects.counts() == {"unknown_option": 1}
    assert eval_set.rejects.items[0].where == "2" and "'E'" in eval_set.rejects.items[0].detail
    sqa = root / "samples/eval/sqa/problems.json"
    problems = json.loads(sqa.read_text())
    first = json.loads((root / "samples/eval/sqa/llava_test_CQM-A.json").read_text())[0]["id"]
    problems[first]["answer"] = 7
    sqa.write_text(json.dumps(problems))
    with pytest.raises(EvalSetError, match="unknown_option"):
        read_eval_set(_spec("tiny-sqa"), root)


def test_duplicate_question_ids_are_rejected_not_scored_twice(root: Path) -> None:
    path = root / "samples/eval/gqa/llava_gqa_testdev_balanced.jsonl"
    _edit_jsonl(path, lambda rows: [*rows, rows[3]])
    eval_set = read_eval_set(_spec("tiny-gqa", max_failure_ratio=0.01), root)
    assert len(eval_set.items) == 192 and eval_set.rejects.counts() == {"duplicate_question": 1}
    assert "line 4" in eval_set.rejects.items[0].detail or ":4" in eval_set.rejects.items[0].detail


def test_pope_labels_out_of_step_with_the_questions_are_refused(root: Path) -> None:
    labels = root / "samples/eval/pope/coco/coco_pope_random.json"
    _edit_jsonl(labels, lambda rows: rows[:-1])
    with pytest.raises(EvalSetError, match="coco_pope_random"):
        read_eval_set(_spec("tiny-pope"), root)


def test_a_missing_file_names_the_role_and_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(EvalSetError, match=r"files.questions .* does not exist: fetch the benchmark's files"):
        read_eval_set(_spec("tiny-gqa"), tmp_path)


def test_a_spec_with_the_wrong_files_names_the_line_and_the_roles() -> None:
    text = (
        "name: x\nkind: eval\nbenchmark: pope\nlicense: CC0\ninstruction: a\nfiles:\n  questions: q.jsonl\n"
    )
    with pytest.raises(EvalSpecError) as err:
        parse_eval_spec(text, "x.yaml")
    assert "x.yaml:" in str(err.value) and "missing ['labels', 'images']" in str(err.value)


def test_the_chance_levels_the_readme_states_for_the_gqa_replica(eval_replicas: Path) -> None:
    """Uniform answers of the question's type score 25.2%; each type's most common answer 33.9%."""
    from collections import Counter

    from tasks.testkit.samples import COUNT_WORDS, POSITIONS

    config = SampleConfig()
    universe = {
        "colour": config.colours,
        "shape": config.kinds,
        "count": COUNT_WORDS[1:4],
        "position": POSITIONS,
    }
    items = read_eval_set(_spec("tiny-gqa"), eval_replicas).items
    kinds = {i.key: next(k for k, words in universe.items() if i.truth in words) for i in items}
    uniform = sum(1 / len(universe[kinds[i.key]]) for i in items) / len(items)
    by_kind: dict[str, Counter] = {}
    for i in items:
        by_kind.setdefault(kinds[i.key], Counter())[i.truth] += 1
    majority = sum(c.most_common(1)[0][1] for c in by_kind.values()) / len(items)
    assert (round(100 * uniform, 1), round(100 * majority, 1)) == (25.2, 33.9)
