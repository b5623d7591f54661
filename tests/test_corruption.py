"""Corrupted state is found on the next run, repaired by rebuilding only the broken piece, and reported.

Data: a truncated, byte-flipped or missing shard, a stray temp file of a killed write, a catalog row
whose shard file is gone. Training: a truncated, garbled or missing checkpoint file, a bad
``latest``, and a checkpoint holding a malicious pickle (refused, never run).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from test_training import _losses, _pretrain

from tasks.core.identity import read_json
from tasks.data.build import BuildResult
from tasks.quality.eval_index import build_decontaminated as build_dataset
from tasks.train.stage import plan_stage, run_stage
from tasks.train.stage_plan import StageError

pytestmark = pytest.mark.usefixtures("ray_local")
SPECS = Path(__file__).resolve().parent.parent / "data_specs"
TEXT, INSTRUCT = "tiny-redpajama", "tiny-llava-instruct"


# --- data ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine(
    samples_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, BuildResult]]:
    """A data root holding finished text and instruct builds (copied per test, never modified)."""
    root = tmp_path_factory.mktemp("corruption_data")
    (root / "samples").symlink_to(samples_root / "samples")
    return root, {name: build_dataset(SPECS / f"{name}.yaml", root) for name in (TEXT, INSTRUCT)}


@pytest.fixture
def data_root(pristine: tuple[Path, dict[str, BuildResult]], tmp_path: Path) -> Path:
    """A private copy of the pristine data root."""
    root = tmp_path / "root"
    shutil.copytree(pristine[0], root, symlinks=True)
    return root


def _shard_files(build: Path) -> dict[str, tuple[int, int]]:
    """{shard path: (inode, mtime_ns)} of every shard tar."""
    return {
        str(p.relative_to(build)): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in sorted((build / "shards").rglob("*.tar"))
    }


def _victim(build: Path) -> tuple[int, dict[str, Any]]:
    """(unit, train shard) of a unit that wrote more than one shard (the others must survive)."""
    for record in sorted((build / "units").glob("*.json")):
        shards = read_json(record)["shards"]
        if len(shards) > 1 and shards[0]["split"] == "train":
            return int(record.stem), shards[0]
    raise AssertionError(f"no unit of {build} wrote two shards")


def _corrupt(path: Path, how: str) -> None:
    if how == "truncated":
        with open(path, "r+b") as handle:
            handle.truncate(path.stat().st_size // 2)
    elif how == "flipped":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif how == "missing":
        path.unlink()
    else:
        raise AssertionError(how)


REASONS = {"truncated": "size mismatch", "flipped": "sha256 mismatch", "missing": "missing"}


@pytest.mark.parametrize(
    ("name", "how", "finished"),
    [(TEXT, "truncated", True), (TEXT, "flipped", True), (TEXT, "missing", True), (TEXT, "flipped", False),
     (INSTRUCT, "truncated", True)],
    ids=["truncated", "flipped", "missing", "flipped-unfinished-build", "instruct-truncated"],
)  # fmt: skip
def test_bad_shard_rebuilds_only_its_unit_and_is_reported(
    pristine: tuple[Path, dict[str, BuildResult]], data_root: Path, name: str, how: str, finished: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    original, spec = pristine[1][name], SPECS / f"{name}.yaml"
    build = data_root / "builds" / name / original.build_id
    unit, victim = _victim(build)
    want = (original.path / victim["path"]).read_bytes()
    _corrupt(build / victim["path"], how)
    stray = build / Path(victim["path"]).parent / f".{Path(victim['path']).name}.k1ll3d.tmp"
    stray.write_bytes(b"half a tar")  # what a kill inside write_shard leaves
    if not finished:
        (build / "manifest.json").unlink()  # killed before finalize: the unit records are checked instead
    before = _shard_files(build)

    with caplog.at_level(logging.WARNING, logger="tasks.data.build"):
        result = build_dataset(spec, data_root)

    assert not result.reused
    assert [(r["shard"], r["reason"].split(" (")[0], r["unit"]) for r in result.repaired] == [
        (victim["path"], REASONS[how], unit)
    ]
    assert result.cleaned == [str(stray.relative_to(build))] and not stray.exists()
    assert (build / victim["path"]).read_bytes() == want  # byte-identical repair
    after = _shard_files(build)
    assert set(after) == set(before) | {victim["path"]}
    untouched = {k: v for k, v in before.items() if k != victim["path"]}
    assert {k: after[k] for k in untouched} == untouched  # no other shard was rewritten
    assert result.manifest["shards"] == original.manifest["shards"]
    assert result.manifest["stats"] == original.manifest["stats"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(victim["path"] in w and REASONS[how] in w for w in warnings), warnings
    assert any(stray.name in w for w in warnings), warnings
    assert build_dataset(spec, data_root).reused  # repaired for good


def test_a_reused_build_hashes_only_the_shards_changed_since_their_last_full_check(
    pristine: tuple[Path, dict[str, BuildResult]], data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At real scale hashing every shard on every retrain costs hours: a reuse hashes only shards whose
    size, mtime, ctime or inode changed since they last verified, and still finds a flipped byte whose
    writer put the mtime back (the ctime tells)."""
    from tasks.data import shards, verified

    monkeypatch.setattr(verified, "RACY_NS", 0)  # the copies are fresh; trust them at once
    hashed: list[str] = []
    real = shards.sha256_file
    monkeypatch.setattr(shards, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    original, spec = pristine[1][TEXT], SPECS / f"{TEXT}.yaml"
    build = data_root / "builds" / TEXT / original.build_id
    every = sorted(Path(s["path"]).name for s in original.manifest["shards"])
    assert build_dataset(spec, data_root).reused and sorted(hashed) == every  # a copy: new inodes
    hashed.clear()
    assert build_dataset(spec, data_root).reused and hashed == []  # nothing changed since
    _, victim = _victim(build)
    path = build / victim["path"]
    before = path.stat()
    _corrupt(path, "flipped")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    hashed.clear()
    result = build_dataset(spec, data_root)
    assert not result.reused and hashed[0] == path.name
    assert [(r["shard"], r["reason"]) for r in result.repaired] == [(victim["path"], "sha256 mismatch")]
    hashed.clear()
    assert build_dataset(spec, data_root, verify_all=True).reused and sorted(hashed) == every


def test_stray_temp_file_is_cleaned_and_a_good_build_reused(
    pristine: tuple[Path, dict[str, BuildResult]], data_root: Path
) -> None:
    original = pristine[1][TEXT]
    build = data_root / "builds" / TEXT / original.build_id
    stray = build / ".manifest.json.x7y8z9.tmp"
    stray.write_text("{")
    before = _shard_files(build)
    result = build_dataset(SPECS / f"{TEXT}.yaml", data_root)
    assert result.reused and result.repaired == [] and result.cleaned == [stray.name]
    assert not stray.exists() and _shard_files(build) == before


def test_catalog_rows_pointing_at_missing_shards_are_found_and_rewritten(
    pristine: tuple[Path, dict[str, BuildResult]], data_root: Path, prefect_api: None
) -> None:
    from flows.data import build_data
    from tasks.data.catalog import missing_shards, query, record_build

    catalog = data_root / "catalog.duckdb"
    first = build_data(TEXT, data_root=str(data_root))  # the build exists: reused and recorded
    assert first["reused"] and first["catalog_repaired"] == [] and first["repaired"] == []
    build = Path(first["path"])
    manifest = read_json(build / "manifest.json")
    gone = "0123456789abcdef"  # an older build of the dataset, recorded, whose folder was deleted since
    record_build(catalog, {**manifest, "build_id": gone}, build.parent / gone, first["spec_path"])
    unit, victim = _victim(build)
    want = (build / victim["path"]).read_bytes()
    (build / victim["path"]).unlink()
    assert {(p["build_id"], p["shard"]) for p in missing_shards(catalog, TEXT)} >= {
        (first["build_id"], victim["path"]),
        (gone, victim["path"]),
    }

    second = build_data(TEXT, data_root=str(data_root))

    assert not second["reused"]
    assert second["repaired"] == [{"shard": victim["path"], "reason": "missing", "unit": unit}]
    by_build = {}
    for p in second["catalog_repaired"]:
        by_build.setdefault((p["build_id"], p["action"]), []).append((p["shard"], p["reason"]))
    assert by_build == {
        (first["build_id"], "build repaired, rows rewritten"): [(victim["path"], "missing")],
        (gone, "rows removed"): [
            (s["path"], "missing") for s in sorted(manifest["shards"], key=lambda s: s["path"])
        ],
    }
    assert (build / victim["path"]).read_bytes() == want
    assert missing_shards(catalog, TEXT) == []

    def rows(sql: str, *params: Any) -> list[tuple]:
        return query(catalog, sql, list(params))[1]

    assert rows("SELECT build_id FROM builds") == [(first["build_id"],)]
    assert rows("SELECT name, latest_build FROM datasets") == [(TEXT, first["build_id"])]
    assert rows("SELECT count(*), count(DISTINCT path) FROM shards") == [(len(manifest["shards"]),) * 2]
    assert rows("SELECT count(*) FROM shards WHERE build_id = ?", gone) == [(0,)]
    assert build_data(TEXT, data_root=str(data_root))["catalog_repaired"] == []


# --- training checkpoints ------------------------------------------------------------------------


class Evil:
    """Unpickling this creates ``marker`` (a stand-in for arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def killed(
    pristine: tuple[Path, dict[str, BuildResult]], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Any, Path]:
    """A 2-worker ZeRO-1 stage killed after step 5 (checkpoints step-2 and step-4), and a copy of its
    folder as it was then."""
    recipe, stage = _pretrain(max_steps=6, checkpoint_every=2)
    runs = tmp_path_factory.mktemp("corruption_runs")
    plan, _ = plan_stage(recipe, stage, {"kind": "scratch", "path": ""}, pristine[0], runs / "killed")
    with pytest.raises(StageError, match="failed"):
        run_stage(dataclasses.replace(plan, kill_at_step=5))
    ckpts = plan.out / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-2", "step-4"]
    assert (ckpts / "latest").read_text() == "step-4"
    snapshot = runs / "snapshot"
    shutil.copytree(plan.out, snapshot)
    return plan, snapshot


def _layout() -> Any:
    from model.ds_checkpoint import CheckpointLayout

    return CheckpointLayout(world_size=2, zero_stage=1)


OPTIM_1 = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
MODEL = "mp_rank_00_model_states.pt"


def _damage(ckpts: Path, case: str) -> None:
    if case == "truncated":
        _corrupt(ckpts / "step-4" / OPTIM_1, "truncated")
    elif case == "garbled":
        _corrupt(ckpts / "step-4" / MODEL, "flipped")
    elif case == "missing-file":
        (ckpts / "step-4" / OPTIM_1).unlink()
    elif case == "latest-empty":
        (ckpts / "latest").write_text("")
    elif case == "latest-dangling":
        (ckpts / "latest").write_text("step-6")
    elif case == "all-bad":
        _corrupt(ckpts / "step-4" / MODEL, "truncated")
        (ckpts / "step-2" / OPTIM_1).unlink()
    else:
        raise AssertionError(case)


CASES = {  # case: (tag resumed from, {moved tag: reason excerpt}, warning excerpt)
    "truncated": ("step-2", {"step-4": f"{OPTIM_1}: not a complete zip archive"}, "step-4"),
    "garbled": ("step-2", {"step-4": "fails its CRC check"}, "step-4"),
    "missing-file": ("step-2", {"step-4": f"{OPTIM_1} is missing"}, "step-4"),
    "latest-empty": ("step-4", {}, "latest is empty"),
    "latest-dangling": ("step-4", {}, "latest named 'step-6', which is not there"),
    "all-bad": (None, {"step-4": f"{MODEL}: not a complete zip archive", "step-2": f"{OPTIM_1} is missing"},
                "starts from scratch"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_bad_checkpoint_is_moved_aside_and_latest_repointed(
    killed: tuple[Any, Path], tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    from model.ds_checkpoint import read_latest, repair_checkpoints, step_tags
    from model.train import prune_checkpoints

    ckpts = tmp_path / "checkpoints"
    shutil.copytree(killed[1] / "checkpoints", ckpts)
    _damage(ckpts, case)
    resume, moved, warning = CASES[case]

    with caplog.at_level(logging.WARNING, logger="model.ds_checkpoint"):
        report = repair_checkpoints(ckpts, _layout())

    assert report.resume_tag == resume and read_latest(ckpts) == resume
    assert {m["tag"]: m["reason"] for m in report.moved}.keys() == moved.keys()
    for m in report.moved:
        assert moved[m["tag"]] in m["reason"], m
        aside = ckpts / m["moved_to"]
        assert aside.is_dir() and aside.name.startswith(f"corrupt-{m['tag']}-")  # kept for a post-mortem
    assert [p.name for p in step_tags(ckpts)] == [t for t in ("step-4", "step-2") if t not in moved]
    text = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert warning in text
    for tag, reason in moved.items():
        assert str(ckpts / tag) in text and reason in text
    again = repair_checkpoints(ckpts, _layout())  # repaired for good: nothing more to do
    assert not again.repaired and again.resume_tag == resume
    prune_checkpoints(ckpts, keep=1)  # folders moved aside do not upset pruning
    assert [p.name for p in step_tags(ckpts)] == ([resume] if resume else [])


@pytest.mark.slow
def test_stage_resumes_from_the_last_good_checkpoint_on_the_same_loss_curve(
    killed: tuple[Any, Path], caplog: pytest.LogCaptureFixture
) -> None:
    plan, snapshot = killed
    ckpts = plan.out / "checkpoints"
    _damage(ckpts, "truncated")  # the newest checkpoint (step-4) lost half of rank 1's optimizer file
    with caplog.at_level(logging.WARNING):
        resumed = run_stage(plan)

    text = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert str(ckpts / "step-4") in text and "not a complete zip archive" in text and "step-2" in text
    assert len(list(ckpts.glob("corrupt-step-4-*"))) == 1
    got, before_kill = _losses(plan.out), _losses(snapshot)
    assert [s for s, _ in got] == list(range(1, 7))  # every step exactly once
    assert [s for s, _ in before_kill] == [1, 2, 3, 4]
    for (step, loss), (_, first_time) in zip(got, before_kill, strict=False):  # steps 3-4 trained twice
        assert loss == pytest.approx(first_time, abs=1e-5), f"step {step}"
    assert resumed["steps"] == 6 and (plan.out / "stage.json").is_file()


@pytest.mark.slow
def test_checkpoint_with_a_malicious_pickle_is_refused_and_never_run(
    pristine: tuple[Path, dict[str, BuildResult]], killed: tuple[Any, Path], tmp_path: Path
) -> None:
    import torch

    from model.ds_checkpoint import safe_torch_load

    probe = tmp_path / "probe-marker"
    torch.save({"x": Evil(probe)}, tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)
    assert probe.exists()  # the payload works: a plain unpickle runs it

    recipe, stage = _pretrain(max_steps=6, checkpoint_every=2)
    plan, _ = plan_stage(recipe, stage, {"kind": "scratch", "path": ""}, pristine[0], tmp_path / "runs")
    shutil.copytree(killed[1], plan.out)
    marker = tmp_path / "pwned"
    target = plan.out / "checkpoints" / "step-4" / MODEL
    state = safe_torch_load(target)
    torch.save({**state, "loop": {**state["loop"], "evil": Evil(marker)}}, target)

    with pytest.raises(
        StageError,
        match=rf"refused to load checkpoint file \S*step-4/{MODEL}: it pickles global (io|builtins)\.open",
    ):
        run_stage(plan)
    assert not marker.exists()
