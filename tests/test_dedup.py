"""Partitioned dedup: equals a global first-occurrence dedup, finds planted near-duplicates, resumes
byte for byte after a kill in the middle of its reduce."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from tasks.core.identity import read_json
from tasks.data.build import build_dataset
from tasks.data.builder import serial_map
from tasks.testkit.chaos import Kill, chaos_run

SPEC = """\
name: {name}
kind: text
profile: tiny
license: CC0-1.0
tokenizer: samples/tokenizer
seq_len: 64
shard_samples: 16
max_failure_ratio: 0.9
filters: {{min_chars: 5, max_chars: 20000}}
dedup: {dedup}
subsets:
  - {{name: web, weight: 1, source: {{type: files, paths: ["raw/web-*.jsonl"]}}}}
"""


def _words(rng: random.Random, n: int) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return sorted({"".join(rng.choice(letters) for _ in range(rng.randint(3, 8))) for _ in range(n)})


def _edit(rng: random.Random, doc: str, vocab: list[str]) -> str:
    """The document with 1-10% of its words replaced."""
    words = doc.split()
    for i in rng.sample(range(len(words)), max(1, round(len(words) * rng.uniform(0.01, 0.10)))):
        words[i] = rng.choice(vocab)
    return " ".join(words)


def _corpus(
    root: Path, files: int = 6, distinct: int = 240, seed: int = 3
) -> dict[str, set[tuple[str, int]]]:
    """Distinct documents plus planted exact copies and near-copies, spread over ``files`` files;
    returns the (file, line) places of each planted kind (the later copies)."""
    rng = random.Random(seed)
    vocab = _words(rng, 4000)
    originals = [" ".join(rng.choice(vocab) for _ in range(rng.randint(40, 90))) for _ in range(distinct)]
    lines: list[list[str]] = [[] for _ in range(files)]
    for i, doc in enumerate(originals):
        lines[i % files].append(doc)
    planted: dict[str, set[tuple[str, int]]] = {"duplicate": set(), "near_duplicate": set()}
    for kind, count in (("duplicate", 40), ("near_duplicate", 60)):
        for i in rng.sample(range(distinct), count):
            f = rng.randrange(i % files, files)  # a later file, or later in the same one
            copy = originals[i] if kind == "duplicate" else _edit(rng, originals[i], vocab)
            lines[f].append(copy)
            planted[kind].add((f"web-{f}.jsonl", len(lines[f])))
    (root / "raw").mkdir(parents=True, exist_ok=True)
    for f, docs in enumerate(lines):
        (root / "raw" / f"web-{f}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return planted


@pytest.fixture
def data_root(samples_root: Path, tmp_path: Path) -> tuple[Path, dict[str, set[tuple[str, int]]]]:
    root = tmp_path / "root"
    root.mkdir()
    (root / "samples").symlink_to(samples_root / "samples")
    return root, _corpus(root)


def _spec(folder: Path, name: str, dedup: str) -> Path:
    path = folder / f"{name}.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(SPEC.format(name=name, dedup=dedup))
    return path


def _rejects(build: Path) -> dict[str, set[tuple[str, int]]]:
    out: dict[str, set[tuple[str, int]]] = {}
    for line in (build / "rejects.jsonl").read_text().splitlines():
        row = json.loads(line)
        out.setdefault(row["reason"], set()).add((Path(row["source"]).name, int(row["where"].split()[1])))
    return out


def _global_exact(root: Path) -> set[tuple[str, int]]:
    """Today's rule, computed in one place: every copy after the first in source order."""
    seen: set[str] = set()
    later = set()
    for f in range(6):
        for n, line in enumerate((root / "raw" / f"web-{f}.jsonl").read_text().splitlines(), start=1):
            text = json.loads(line)["text"]
            if text in seen:
                later.add((f"web-{f}.jsonl", n))
            seen.add(text)
    return later


def _shard_hashes(build: Path) -> list[str]:
    return [rec["sha256"] for rec in read_json(build / "manifest.json")["shards"]]


@pytest.mark.usefixtures("ray_local")
def test_partitioned_exact_dedup_equals_global_dedup(data_root, tmp_path: Path) -> None:
    root, planted = data_root
    expected = _global_exact(root)
    assert expected == planted["duplicate"]
    hashes = []
    for partitions, fan_out in ((1, serial_map), (7, None), (64, serial_map)):
        spec = _spec(tmp_path / "specs", f"exact-{partitions}", f"{{partitions: {partitions}}}")
        result = build_dataset(spec, root, fan_out=fan_out)
        assert _rejects(result.path) == {"duplicate": expected}
        hashes.append(_shard_hashes(result.path))
    assert hashes[0] == hashes[1] == hashes[2]  # same kept documents, same shards, whatever the partitions


@pytest.mark.usefixtures("ray_local")
def test_minhash_finds_planted_near_duplicates_with_precision_and_recall_0_95(
    data_root, tmp_path: Path
) -> None:
    root, planted = data_root
    dedup = "{partitions: 5, minhash: {threshold: 0.5, ngram: 2, num_perm: 128, bands: 32}}"
    result = build_dataset(_spec(tmp_path / "specs", "near", dedup), root)
    found = _rejects(result.path)
    assert found["duplicate"] == planted["duplicate"]
    near = found.get("near_duplicate", set())
    true = near & planted["near_duplicate"]
    precision, recall = len(true) / max(1, len(near)), len(true) / len(planted["near_duplicate"])
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)
    row = next(
        json.loads(r) for r in (result.path / "rejects.jsonl").read_text().splitlines() if "near_" in r
    )
    kept_file, kept_line = row["detail"].rsplit(" ", 3)[-3], int(row["detail"].rsplit(" ", 1)[-1])
    kept = json.loads((root / "raw" / kept_file).read_text().splitlines()[kept_line - 1])["text"]
    mine = json.loads(
        (root / "raw" / Path(row["source"]).name).read_text().splitlines()[int(row["where"][5:]) - 1]
    )
    shared = set(kept.split()) & set(mine["text"].split())
    assert len(shared) >= 0.8 * len(set(mine["text"].split()))  # the named document is the original
    before = _shard_hashes(result.path)  # the same spec has the same build folder: read it before the rebuild
    rejects = (result.path / "rejects.jsonl").read_bytes()
    again = build_dataset(_spec(tmp_path / "serial", "near", dedup), root, force=True, fan_out=serial_map)
    assert again.path == result.path and not again.reused
    assert _shard_hashes(again.path) == before  # scheduling (Ray or one process) does not pick the copy
    assert (again.path / "rejects.jsonl").read_bytes() == rejects


def test_a_kill_in_the_middle_of_dedup_resumes_to_the_same_shards(data_root, tmp_path: Path) -> None:
    root, _ = data_root
    dedup = "{partitions: 6, minhash: {threshold: 0.5, ngram: 2, num_perm: 64, bands: 16}}"
    spec = _spec(tmp_path / "specs", "killed", dedup)
    script = (
        "import sys\nfrom tasks.data.build import build_dataset\nfrom tasks.data.builder import serial_map\n"
        "build_dataset(sys.argv[1], sys.argv[2], fan_out=serial_map)\n"
    )
    cmd = [sys.executable, "-c", script, str(spec), str(root)]
    attempts = chaos_run(cmd, [Kill("dedup-bucket", 4)], tmp_path / "chaos", attempt_timeout_s=300)
    assert [a.outcome for a in attempts] == ["killed", "exit"]
    killed = build_dataset(spec, root, fan_out=serial_map)
    assert killed.reused
    fresh_root = tmp_path / "fresh"
    fresh_root.mkdir()
    (fresh_root / "samples").symlink_to(root / "samples")
    (fresh_root / "raw").symlink_to(root / "raw")
    fresh = build_dataset(spec, fresh_root, fan_out=serial_map)
    assert fresh.build_id == killed.build_id
    assert _shard_hashes(fresh.path) == _shard_hashes(killed.path)
    rejects = [
        (b.path / "rejects.jsonl").read_text().replace(str(r), "ROOT")
        for b, r in ((fresh, fresh_root), (killed, root))
    ]
    assert rejects[0] == rejects[1] and '"near_duplicate"' in rejects[0]


def test_every_near_identical_image_is_found_however_big_its_band_groups(tmp_path: Path) -> None:
    """20,000 images share one of their 17 bit blocks (as flat or similar pictures share bits): that
    band group holds all of them. Each planted copy differs from its original by one bit in each of
    the other 16 blocks (16 bits in all), so that one group is the only place the pair meets, with the
    original deep inside it: every earlier member is compared, so every copy is found."""
    from tasks.data.builder import serial_map
    from tasks.data.dedup import DedupPlan, NearRule, UnitKeys, run_reduce, scan_wheres, unit_drops

    rng = np.random.default_rng(0)
    rule = NearRule("phash", 17, 16, "near_duplicate_image")
    n, copies, units = 20_000, 100, 4
    bits = rng.integers(0, 2, size=(n, 192), dtype=np.uint8)
    blocks = np.array_split(np.arange(192), rule.bands)
    bits[:, blocks[-1]] = 1  # the shared block
    originals = rng.choice(np.arange(1000, n), copies, replace=False)  # far from a group's first members
    planted = bits[originals].copy()
    for row in planted:
        for block in blocks[:-1]:
            row[rng.choice(block)] ^= 1
    hashes = np.packbits(np.concatenate([bits, planted]), axis=1).view(">u8").astype(np.uint64)
    plan = DedupPlan(str(tmp_path / "dedup"), 4, False, rule)
    per_unit = -(-len(hashes) // units)
    scans = []
    for unit in range(units):
        keys = UnitKeys(plan)
        for pos in range(unit * per_unit, min(len(hashes), (unit + 1) * per_unit)):
            keys.add("0" * 32, str(pos), hashes[pos])
        scans.append(keys.save(unit, "s", "src", {"read": 0}))
    run_reduce(plan, scans, serial_map, "one big group")
    dropped = {}
    for unit in range(units):
        wheres = scan_wheres(plan, unit)
        dropped |= {
            int(wheres[pos]): int(drop.kept.split()[-1]) for pos, drop in unit_drops(plan, unit).items()
        }
    assert dropped == {n + k: int(o) for k, o in enumerate(originals)}  # each copy, naming its original


def test_documents_without_words_are_not_near_copies_of_each_other() -> None:
    from tasks.data.signatures import minhash_signature

    first, second = minhash_signature("★★ ☆ ★", 5, 128), minhash_signature("♠♣ ♥ ♦♦", 5, 128)
    assert float(np.mean(first == second)) < 0.2  # they used to share the empty shingle: identical
    assert (minhash_signature("★★ ☆ ★", 5, 128) == first).all()  # and each is still deterministic
