"""A credential referenced by a spec is resolved at use time and written nowhere.

The spec's ``hf`` source names its token as ``${MVLM_TEST_HF_TOKEN}``; the dataset is a local
folder, which ``datasets.load_dataset`` reads offline, so the token is really resolved and handed to
the hub client while the whole build-data flow runs (build, catalog, preview) and the build is
published to MLflow. Then every byte under the data root, the MLflow store and its artifacts, and
the captured logs is searched for the token. (The chaos test greps a whole retrain for a planted
``HF_TOKEN`` the same way.)
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


SPEC = """\
name: secret-text
kind: text
profile: tiny
description: A local folder read through the hf source, with a token.
license: CC0-1.0
tokenizer: {tokenizer}
seq_len: 32
shard_samples: 16
heldout_fraction: 0.1
max_failure_ratio: 0.5
subsets:
  - name: web
    weight: 1.0
    source: {{type: hf, dataset: {corpus}, revision: main, token: "${{MVLM_TEST_HF_TOKEN}}"}}
"""


def test_a_resolved_token_is_in_nothing_the_build_and_its_mlflow_run_write(
    samples_root: Path, tmp_path: Path
) -> None:
    """``mvlm data build`` as a user runs it (own local Ray, so its workers inherit the token)."""
    from tasks.lineage import tracking
    from tasks.lineage.publish import log_build

    token = "hf_" + secrets.token_hex(16)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    with (corpus / "part-0.jsonl").open("w") as out:
        for i in range(80):
            out.write(json.dumps({"text": f"Document {i} is about a red fox near a river. " * 3}) + "\n")
    spec_dir = tmp_path / "specs"
    spec_dir.mkdir()
    tokenizer = samples_root / "samples" / "tokenizer"
    (spec_dir / "secret-text.yaml").write_text(SPEC.format(tokenizer=tokenizer, corpus=corpus))
    data_root = tmp_path / "data"
    env = {
        **os.environ, "MVLM_TEST_HF_TOKEN": token, "HF_HUB_OFFLINE": "1", "MVLM_SPEC_DIR": str(spec_dir),
        "MVLM_WORK_DIR": str(tmp_path / "work"), "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MVLM_NO_PROGRESS": "1", "COLUMNS": "200",
    }  # fmt: skip
    for key in ("PREFECT_API_URL", "RAY_ADDRESS"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "flows.cli", "data", "build", "secret-text", "--data-root", str(data_root)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (manifest_path,) = data_root.glob("builds/secret-text/*/manifest.json")
    manifest = json.loads(manifest_path.read_text())
    assert manifest["stats"]["totals"]["kept"] > 0 and manifest["shards"]
    assert manifest["spec"]["subsets"][0]["source"]["token"] == "${MVLM_TEST_HF_TOKEN}"  # the reference only

    mlflow = tracking.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent, _ = tracking.run_for(mlflow, tracking.EXPERIMENT, "retrain/secret", "retrain secret")
    summary = {
        "name": manifest["name"], "build_id": manifest["build_id"], "path": str(manifest_path.parent),
        "kind": manifest["kind"], "totals": manifest["stats"]["totals"], "spec_path": str(spec_dir),
    }  # fmt: skip
    log_build(mlflow, summary, parent)

    leaks, scanned = [], 0
    for root in (data_root, tmp_path / "work", tmp_path / "prefect", tmp_path / "mlflow.db"):
        for path in [root] if root.is_file() else root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                scanned += 1
                if token.encode() in path.read_bytes():
                    leaks.append(str(path))
    assert scanned > 10 and not leaks, leaks
    assert token not in done.stdout + done.stderr

    # positive controls: the scan finds a planted copy, and the build really needs (so resolved) the token
    planted = data_root / "planted.txt"
    planted.write_text(f"token={token}\n")
    assert token.encode() in planted.read_bytes() and any(
        token.encode() in p.read_bytes() for p in data_root.rglob("*") if p.is_file() and not p.is_symlink()
    )
    planted.unlink()
    unset = {k: v for k, v in env.items() if k != "MVLM_TEST_HF_TOKEN"}
    failed = subprocess.run([*cmd, "--force"], env=unset, capture_output=True, text=True, timeout=300)
    assert failed.returncode != 0 and "MVLM_TEST_HF_TOKEN is not set" in failed.stdout + failed.stderr, (
        failed.stdout[-2000:] + failed.stderr[-2000:]
    )


def test_an_unset_credential_names_the_variable_and_the_process(monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.data.specs import resolve_env

    monkeypatch.delenv("MVLM_TEST_UNSET_TOKEN", raising=False)
    expected = r"MVLM_TEST_UNSET_TOKEN is not set in process \d+ on .*on a Ray cluster"
    with pytest.raises(KeyError, match=expected):
        resolve_env("${MVLM_TEST_UNSET_TOKEN}")
