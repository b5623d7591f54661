"""Hub sources are pinned: the revision is resolved to a commit at plan time, that sha is in the build
identity and the manifest, and the data is read at it. The real ``huggingface_hub`` and ``datasets``
clients talk to a loopback stand-in for the hub (``tests/fake_hub.py``) serving a tiny parquet dataset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fake_hub import serve_hub

pytestmark = pytest.mark.slow

SHA_A, SHA_B = "a" * 40, "b" * 40
SPEC = """\
name: {name}
kind: text
profile: tiny
license: CC0-1.0
tokenizer: {tokenizer}
seq_len: 32
shard_samples: 16
max_failure_ratio: 0.2
subsets:
  - {{name: web, source: {{type: hf, dataset: {dataset}, revision: main, split: train}}}}
"""
DRIVER = """
import json, sys
from pathlib import Path
from tasks.data.build import BuildError, build_dataset
specs, data, hub = (Path(p) for p in sys.argv[1:4])
out = {}
for step, sha in (("first", None), ("moved", sys.argv[4]), ("again", None)):
    if sha:
        (hub / "user/tiny-web/refs.json").write_text(json.dumps({"main": sha}))
    result = build_dataset(specs / "hub-web.yaml", data)
    out[step] = {"build_id": result.build_id, "reused": result.reused, "source": result.manifest["source"],
                 "documents": result.manifest["stats"]["totals"]["documents"]}
try:
    build_dataset(specs / "hub-script.yaml", data)
    out["script"] = "built"
except BuildError as err:
    out["script"] = str(err)
print("RESULT" + json.dumps(out))
"""


def _commit(root: Path, repo: str, sha: str, docs: int) -> None:
    folder = root / repo / sha / "data"
    folder.mkdir(parents=True)
    rows = [f"Document {i} of the tiny web crawl: foxes and rivers, take {i}." for i in range(docs)]
    pq.write_table(pa.table({"text": rows}), folder / "train-00000-of-00001.parquet")


def test_hub_revisions_are_resolved_pinned_and_read_at_their_commit(
    samples_root: Path, tmp_path: Path
) -> None:
    hub = tmp_path / "hub"
    _commit(hub, "user/tiny-web", SHA_A, 20)
    _commit(hub, "user/tiny-web", SHA_B, 30)
    (hub / "user/tiny-web/refs.json").write_text(json.dumps({"main": SHA_A}))
    script = hub / "user/scripted" / ("c" * 40)
    script.mkdir(parents=True)
    (script / "scripted.py").write_text("import datasets  # a loading script\n")
    (script / "urls.txt").write_text("https://example.org/a.jsonl\n")
    (hub / "user/scripted/refs.json").write_text(json.dumps({"main": "c" * 40}))
    specs = tmp_path / "specs"
    specs.mkdir()
    tokenizer = samples_root / "samples" / "tokenizer"
    for name, dataset in (("hub-web", "user/tiny-web"), ("hub-script", "user/scripted")):
        (specs / f"{name}.yaml").write_text(SPEC.format(name=name, tokenizer=tokenizer, dataset=dataset))
    with serve_hub(hub) as (endpoint, requests):
        env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"),
               "MVLM_NO_PROGRESS": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}  # fmt: skip
        for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "RAY_ADDRESS"):
            env.pop(key, None)
        cmd = [sys.executable, "-c", DRIVER, str(specs), str(tmp_path / "data"), str(hub), SHA_B]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = json.loads(done.stdout.split("RESULT", 1)[1])
    first, moved, again = out["first"], out["moved"], out["again"]
    assert first["source"]["web"]["sha"] == SHA_A and first["documents"] == 20
    assert moved["source"]["web"]["sha"] == SHA_B and moved["documents"] == 30  # main moved: a new build
    assert moved["build_id"] != first["build_id"]
    assert again["build_id"] == moved["build_id"] and again["reused"]
    reads = [r for r in requests if "/resolve/" in r and r.endswith(".parquet")]
    assert reads and all(f"/resolve/{SHA_A}/" in r or f"/resolve/{SHA_B}/" in r for r in reads), reads
    assert "loading-script dataset (scripted.py)" in out["script"] and "remote_files" in out["script"]
    assert not (tmp_path / "data" / "builds" / "hub-script").exists()  # refused at plan time
