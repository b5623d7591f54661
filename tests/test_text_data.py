"""Text builds: filters by reason, exact packing, identity, resume, interop (real Ray)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from model.tokenizer import load_tokenizer
from tasks.core.identity import sha256_file
from tasks.data.build import BuildError, build_dataset
from tasks.data.shard_read import read_tar_samples, text_rows

pytestmark = pytest.mark.usefixtures("ray_local")

SPEC = """\
name: {name}
kind: text
profile: tiny
license: CC0-1.0
tokenizer: samples/tokenizer
seq_len: 32
shard_samples: 8
heldout_fraction: {heldout}
max_failure_ratio: {ratio}
filters: {{min_chars: 5, max_chars: 2000}}
subsets:
  - {{name: web, weight: 3, source: {{type: files, paths: [raw/web.jsonl]}}}}
  - {{name: wiki, weight: 1, source: {{type: files, paths: [raw/wiki.jsonl]}}}}
"""

GOOD = [f"Document number {i} talks about a red circle and a blue square, sentence {i}." for i in range(40)]


def _hostile_web() -> bytes:
    lines = [b"\xef\xbb\xbf" + json.dumps({"text": GOOD[0]}).encode()]  # BOM on the first line
    lines += [json.dumps({"text": t}).encode() for t in GOOD[1:20]]
    lines += [
        b'{"text": "unterminated',  # invalid_json
        json.dumps({"body": "no text field"}).encode(),  # missing_field
        b'{"text": "bad \xff\xfe bytes"}',  # invalid_utf8
        json.dumps({"text": "   \t  "}).encode(),  # empty
        json.dumps({"text": "abc"}).encode(),  # too_short
        json.dumps({"text": "x" * 3000}).encode(),  # too_long
        json.dumps({"text": 42}).encode(),  # bad_type
        json.dumps(["a", "list"]).encode(),  # not_an_object
        json.dumps({"text": GOOD[3]}).encode(),  # duplicate (same file)
        json.dumps({"text": "Windows\r\nline\x00ends here."}).encode(),  # kept, normalised
    ]
    return b"\n".join(lines) + b"\n"


def _write_inputs(root: Path) -> None:
    (root / "raw").mkdir(parents=True, exist_ok=True)
    (root / "raw" / "web.jsonl").write_bytes(_hostile_web())
    wiki = [json.dumps({"text": t}) for t in GOOD[20:]] + [
        json.dumps({"text": GOOD[5]})
    ]  # cross-file duplicate
    (root / "raw" / "wiki.jsonl").write_text("\n".join(wiki) + "\n")


@pytest.fixture
def data_root(samples_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    (root / "samples").symlink_to(samples_root / "samples")
    _write_inputs(root)
    return root


def _spec(tmp_path: Path, name: str = "hostile-text", heldout: float = 0.0, ratio: float = 0.5) -> Path:
    path = tmp_path / "specs" / f"{name}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(SPEC.format(name=name, heldout=heldout, ratio=ratio))
    return path


def _sequences(build: Path, manifest: dict, split: str = "train") -> list[tuple[list[int], list[int]]]:
    out = []
    for rec in manifest["shards"]:
        if rec["split"] == split:
            for sample in read_tar_samples(build / rec["path"]):
                out += [(ids.tolist(), starts.tolist()) for ids, starts in text_rows(sample)]
    return out


def test_every_bad_line_is_counted_by_reason_and_kept_aside(data_root: Path, tmp_path: Path) -> None:
    result = build_dataset(_spec(tmp_path), data_root)
    stats = result.manifest["stats"]
    assert stats["rejects"] == {
        "bad_type": 1, "duplicate": 2, "empty": 1, "invalid_json": 1, "invalid_utf8": 1, "missing_field": 1,
        "not_an_object": 1, "too_long": 1, "too_short": 1,
    }  # fmt: skip
    assert stats["totals"]["read"] == 30 + 21 and stats["totals"]["rejected"] == 10
    rows = [json.loads(line) for line in (result.path / "rejects.jsonl").read_text().splitlines()]
    by_reason = {r["reason"]: r for r in rows}
    assert by_reason["invalid_json"]["where"] == "line 21" and by_reason["invalid_json"]["source"].endswith(
        "web.jsonl"
    )
    assert by_reason["invalid_utf8"]["where"] == "line 23"
    assert {r["where"] for r in rows if r["reason"] == "duplicate"} == {"line 29", "line 21"}


def test_reject_rows_stay_in_unit_files_and_never_reach_the_driver(data_root: Path, tmp_path: Path) -> None:
    """The driver gets counts per reason from each unit, not rows: rejects.jsonl is the units' reject
    files streamed in unit order; a unit record written before those files existed (rows inline)
    merges to the same bytes."""
    from dataclasses import asdict

    from tasks.data.build import make_context, merge_rejects
    from tasks.data.builder import UnitResult, finished_unit, unit_record_path, unit_rejects_path

    spec = _spec(tmp_path)
    result = build_dataset(spec, data_root)
    ctx = make_context(spec, data_root)
    units = [finished_unit(ctx, i) for i in range(len(list((result.path / "units").glob("*.json"))))]
    assert all(u is not None and u.rejects == [] for u in units)  # what a unit hands back: no rows
    from tasks.data.dedup import scan_record, scan_rejects
    from tasks.data.text import dedup_plan

    plan = dedup_plan(ctx)  # nor does a scan record (the pack step reads the scan's rejects file)
    scans = [scan_record(plan, u.index) for u in units]
    assert all("rejects" not in scan for scan in scans)
    scanned = sum(len(scan_rejects(plan, u.index)) for u in units)
    assert sum(scan["rejected"] for scan in scans) == scanned == 8  # all but the 2 duplicates
    hostile = next(u.index for u in units if scan_rejects(plan, u.index))  # a scan record as older
    rows = scan_rejects(plan, hostile)  # builds wrote it: rows inline, no rejects file
    old_scan = {**scan_record(plan, hostile), "rejects": rows}
    plan.path("scan", f"{hostile:05d}.json").write_text(json.dumps(old_scan))
    plan.path("scan", f"{hostile:05d}.rejects.json").unlink()
    assert scan_rejects(plan, hostile) == rows
    assert sum(sum(u.reject_counts.values()) for u in units) == 10
    merged = "".join(unit_rejects_path(ctx, u.index).read_text() for u in units)
    assert (result.path / "rejects.jsonl").read_text() == merged and merged.count("\n") == 10

    web = next(u for u in units if u.reject_counts)  # rewrite its record as an older build left it
    rows = [json.loads(line) for line in unit_rejects_path(ctx, web.index).read_text().splitlines()]
    old = UnitResult(web.index, web.subset, web.shards, web.counts, rows)
    unit_record_path(ctx, web.index).write_text(json.dumps(asdict(old)))
    unit_rejects_path(ctx, web.index).unlink()
    again = [finished_unit(ctx, u.index) for u in units]
    reasons, contamination = merge_rejects(ctx, again)
    assert (result.path / "rejects.jsonl").read_text() == merged
    assert reasons == result.manifest["stats"]["rejects"] and contamination == []


def test_packing_is_exact_with_eos_and_document_starts(data_root: Path, tmp_path: Path) -> None:
    result = build_dataset(_spec(tmp_path), data_root)
    tok = load_tokenizer(data_root / "samples" / "tokenizer")
    kept_web = [*GOOD[:20], "Windows\nline ends here."]
    expected: list[int] = []
    doc_starts: list[int] = []
    for text in kept_web:
        doc_starts.append(len(expected))
        expected += [*tok(text, add_special_tokens=False)["input_ids"], tok.eos_token_id]
    web = [s for s in _sequences(result.path, result.manifest) if True][: len(expected) // 32]
    flat = [t for ids, _ in web for t in ids]
    assert all(len(ids) == 32 for ids, _ in web)  # no padding
    assert flat == expected[: len(flat)]
    got_starts = [i * 32 + s for i, (_, starts) in enumerate(web) for s in starts]
    assert got_starts == [s for s in doc_starts if s < len(flat)]
    totals = result.manifest["stats"]["totals"]
    assert totals["tokens"] == 32 * totals["sequences"]


def test_rebuild_is_a_noop_and_identity_follows_inputs(data_root: Path, tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    first = build_dataset(spec, data_root)
    again = build_dataset(spec, data_root)
    assert again.reused and again.build_id == first.build_id
    with (data_root / "raw" / "wiki.jsonl").open("a") as handle:
        handle.write(json.dumps({"text": "A new document arrives with new words."}) + "\n")
    changed = build_dataset(spec, data_root)
    assert not changed.reused and changed.build_id != first.build_id


def test_killed_build_resumes_to_identical_bytes(data_root: Path, tmp_path: Path) -> None:
    spec = _spec(tmp_path, heldout=0.2)
    first = build_dataset(spec, data_root)
    files = sorted(p for p in first.path.rglob("*") if p.is_file())
    digests = {p.relative_to(first.path): sha256_file(p) for p in files}
    # Simulate a crash: manifest not yet written, one unit unrecorded, one shard half-written.
    (first.path / "manifest.json").unlink()
    (first.path / "units" / "00001.json").unlink()
    shard = first.path / first.manifest["shards"][-1]["path"]
    shard.write_bytes(shard.read_bytes()[:100])
    resumed = build_dataset(spec, data_root)
    assert not resumed.reused
    assert {p.relative_to(resumed.path): sha256_file(p) for p in files} == digests
    assert {rec["split"] for rec in resumed.manifest["shards"]} == {"train", "heldout"}
    shutil.rmtree(first.path)
    fresh = build_dataset(spec, data_root)
    assert {p.relative_to(fresh.path): sha256_file(p) for p in files} == digests


def test_failure_ratio_exceeded_fails_with_a_clear_message(data_root: Path, tmp_path: Path) -> None:
    with pytest.raises(BuildError) as err:
        build_dataset(_spec(tmp_path, ratio=0.05), data_root)
    message = str(err.value)
    assert "hostile-text: 10 of 51 samples rejected" in message and "max_failure_ratio 5.0%" in message
    assert "rejects.jsonl" in message


def test_shards_read_back_with_webdataset_and_ray_data(data_root: Path, tmp_path: Path) -> None:
    import ray.data
    import webdataset as wds

    result = build_dataset(_spec(tmp_path), data_root)
    paths = [str(result.path / r["path"]) for r in result.manifest["shards"]]
    samples = list(wds.WebDataset(paths, shardshuffle=False).decode())
    sequences = [row for s in samples for row in s["input_ids.npy"]]
    assert len(sequences) == sum(r["samples"] for r in result.manifest["shards"])
    assert all(s["input_ids.npy"].ndim == 2 and s["input_ids.npy"].shape[1] == 32 for s in samples)
    ours = [
        ids.tolist()
        for rec in result.manifest["shards"]
        for sample in read_tar_samples(result.path / rec["path"])
        for ids, _ in text_rows(sample)
    ]
    assert [row.tolist() for row in sequences] == ours
    rows = ray.data.read_webdataset(paths).take_all()
    assert len(rows) == len(samples)
    assert sorted(r["__key__"] for r in rows) == sorted(s["__key__"] for s in samples)
    assert sum(len(r["input_ids.npy"]) for r in rows) == len(sequences)


def test_a_new_spec_file_builds_without_code_changes(data_root: Path, tmp_path: Path) -> None:
    result = build_dataset(_spec(tmp_path, name="brand-new-corpus"), data_root)
    assert result.name == "brand-new-corpus"
    assert result.path == data_root / "builds" / "brand-new-corpus" / result.build_id


def test_concurrent_builds_of_one_identity_build_once(data_root: Path, tmp_path: Path) -> None:
    """Two processes building the same spec at once: one builds, the other waits and reuses it."""
    import subprocess
    import sys

    spec = _spec(tmp_path, name="shared-corpus")
    script = (
        "import json, os, sys; os.environ['MVLM_NO_PROGRESS'] = '1'\n"
        "from tasks.data.build import build_dataset\n"
        "r = build_dataset(sys.argv[1], sys.argv[2])\n"
        "print(json.dumps({'reused': r.reused, 'id': r.build_id}))\n"
    )
    env = {**__import__("os").environ, "RAY_ADDRESS": ""}
    cmd = [sys.executable, "-c", script, str(spec), str(data_root)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = [json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(r["reused"] for r in results) == [False, True]
    assert results[0]["id"] == results[1]["id"]
    assert build_dataset(spec, data_root).reused


def test_shards_cost_at_most_2_1_bytes_per_token_at_seq_len_2048(data_root: Path, tmp_path: Path) -> None:
    """Many sequences per tar sample and no PAX headers: the disk holds ~2 bytes (uint16) per token."""
    import random

    rng = random.Random(7)
    words = ["red", "blue", "circle", "square", "draws", "under", "a", "the", "small", "over", "large"]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(50, 900))) for _ in range(700)]
    (data_root / "raw" / "long.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    spec = tmp_path / "specs" / "long-text.yaml"
    spec.parent.mkdir(exist_ok=True)
    spec.write_text(
        SPEC.format(name="long-text", heldout=0.0, ratio=0.5)
        .replace("seq_len: 32", "seq_len: 2048")
        .replace("shard_samples: 8", "shard_samples: 2048")  # as data_specs/redpajama-v1.yaml
        .replace("max_chars: 2000", "max_chars: 20000")
        .split("subsets:")[0]
        + "subsets:\n  - {name: long, weight: 1, source: {type: files, paths: [raw/long.jsonl]}}\n"
    )
    result = build_dataset(spec, data_root)
    tokens = result.manifest["stats"]["totals"]["tokens"]
    on_disk = sum(r["bytes"] for r in result.manifest["shards"])
    assert tokens >= 200 * 2048
    assert on_disk / tokens <= 2.1, f"{on_disk / tokens:.3f} bytes per token"
    assert all(r["samples"] * 2048 == r["tokens"] for r in result.manifest["shards"])
