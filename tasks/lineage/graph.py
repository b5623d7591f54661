"""Registered models and lineage: what made a model version, and what was made from it.

Each stage output and each GGUF quantization is a registered model version tagged with the run that
made it (``mvlm.run_id``), its identity, the model version it started from
(``mvlm.parent_model``) and the dataset digests it saw. The lineage of a version walks those tags
upstream (model versions, stage runs, dataset inputs, recipe, code commit) and downstream (later
stages, quantizations, device benchmark runs that name the version in ``mvlm.model_version``).
"""

from __future__ import annotations

import html
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.lineage import tags as tag


def code_commit() -> str:
    """The git commit of the code (``unknown`` outside a checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def register(
    mlflow: Any,
    name: str,
    run_id: str,
    source: str,
    identity: str,
    parent: str | None,
    datasets: dict[str, str],
    description: str = "",
    link_run_id: str | None = None,
) -> str:
    """Register (once per identity) a model version made by ``run_id``; returns ``name@version``.

    The version's MLflow run link is ``run_id``, the run whose artifacts hold ``source`` (an MLflow
    server refuses any other run); that run is a child of the retrain run, whose id
    (``link_run_id``) is kept in the ``mvlm.retrain_run_id`` tag. ``mvlm.run_id`` drives lineage.
    """
    from mlflow.exceptions import MlflowException

    try:
        mlflow.create_registered_model(name, description=description)
    except MlflowException as err:
        if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
            raise
    for version in mlflow.search_model_versions(f"name='{name}'"):
        if version.tags.get(tag.IDENTITY) == identity:
            return f"{name}@{version.version}"
    from tasks.core import faults

    faults.hit("register")
    tags = {
        tag.IDENTITY: identity,
        tag.RUN_ID: run_id,
        tag.PARENT_MODEL: parent or "",
        tag.DATASETS: json.dumps(datasets, sort_keys=True),
        tag.RETRAIN_RUN_ID: link_run_id or "",
    }
    version = mlflow.create_model_version(name, source, run_id=run_id, tags=tags, description=description)
    return f"{name}@{version.version}"


# --- the graph -------------------------------------------------------------------------------------


@dataclass
class Node:
    """One box of the lineage tree."""

    label: str
    """What it is, e.g. ``model tiny-mobilevlm-instruct@1``."""
    details: dict[str, str] = field(default_factory=dict)
    """Key facts (digests, run ids, metrics)."""
    children: list[Node] = field(default_factory=list)
    """Things it came from (upstream tree) or made (downstream tree)."""


def split_ref(ref: str) -> tuple[str, str | None]:
    """``name@version`` -> (name, version or None for the latest)."""
    name, _, version = ref.partition("@")
    return name, version or None


def get_version(mlflow: Any, ref: str) -> Any:
    """The model version ``name@version`` (latest when no version is given)."""
    name, version = split_ref(ref)
    versions = mlflow.search_model_versions(f"name='{name}'")
    if not versions:
        known = sorted({m.name for m in mlflow.search_registered_models()})
        raise KeyError(f"no registered model {name!r}; known: {', '.join(known) or '(none)'}")
    if version is None:
        return max(versions, key=lambda v: int(v.version))
    for v in versions:
        if str(v.version) == version:
            return v
    raise KeyError(f"{name} has no version {version}; versions: {sorted(int(v.version) for v in versions)}")


def upstream(mlflow: Any, ref: str) -> Node:
    """What made ``ref``: its run, datasets, recipe, code, and the model version it started from."""
    version = get_version(mlflow, ref)
    run = mlflow.get_run(version.tags[tag.RUN_ID])
    tags, params = run.data.tags, run.data.params
    node = Node(
        f"model {version.name}@{version.version}",
        {
            "identity": version.tags.get(tag.IDENTITY, ""),
            "run": run.info.run_id,
            "run name": run.info.run_name,
            "code": tags.get(tag.CODE_COMMIT, "unknown"),
        },
    )
    if params.get("recipe"):
        node.details["recipe"] = params["recipe"]
    stage = params.get("stage.name") or tags.get(tag.STAGE)
    if stage:
        node.details["stage"] = stage
    for inp in run.inputs.dataset_inputs:
        d = inp.dataset
        facts = {"digest (build id)": d.digest, "source": d.source, **_spec_facts(mlflow, d.digest)}
        node.children.append(Node(f"dataset {d.name}", facts))
    parent = version.tags.get(tag.PARENT_MODEL)
    if parent:
        node.children.append(upstream(mlflow, parent))
    return node


def _spec_facts(mlflow: Any, build_id: str) -> dict[str, str]:
    """Spec file and kind of a build, from the build's own run (when a retrain logged one)."""
    from tasks.lineage.tracking import EXPERIMENT, experiment_id

    exp = experiment_id(mlflow, EXPERIMENT)
    runs = mlflow.search_runs(
        [exp], filter_string=f"tags.`{tag.IDENTITY}` = 'build/{build_id}'", max_results=1
    )
    if not runs:
        return {}
    params = runs[0].data.params
    return {"spec": params.get("spec_path") or params.get("spec", ""), "kind": params.get("kind", "")}


def downstream(mlflow: Any, ref: str) -> Node:
    """What was made from ``ref``: later model versions, quantizations, device benchmark results."""
    version = get_version(mlflow, ref)
    full = f"{version.name}@{version.version}"
    node = Node(f"model {full}")
    for model in mlflow.search_registered_models():
        for v in mlflow.search_model_versions(f"name='{model.name}'"):
            if v.tags.get(tag.PARENT_MODEL) == full:
                node.children.append(downstream(mlflow, f"{v.name}@{v.version}"))
    for run in _bench_runs(mlflow, version.tags.get(tag.RUN_ID, "")):
        metrics = {k: f"{v:.2f}" for k, v in sorted(run.data.metrics.items()) if k.endswith(("tps", "_s"))}
        label = f"device result {run.data.tags.get('device', '?')} ({run.data.tags.get('backend', '?')})"
        node.children.append(Node(label, {"run": run.info.run_id, **dict(list(metrics.items())[:6])}))
    return node


def _bench_runs(mlflow: Any, quant_run_id: str) -> list[Any]:
    """Device benchmark runs of a quantization (children of its run)."""
    from tasks.lineage.tracking import EXPERIMENT, experiment_id

    if not quant_run_id:
        return []
    exp = experiment_id(mlflow, EXPERIMENT)
    return mlflow.search_runs([exp], filter_string=tag.search(tag.QUANT_RUN_ID, quant_run_id))


def render_text(node: Node) -> Any:
    """A rich Tree of the lineage."""
    from rich.tree import Tree

    def add(tree: Any, n: Node) -> None:
        branch = tree.add(_label(n))
        for child in n.children:
            add(branch, child)

    root = Tree(_label(node))
    for child in node.children:
        add(root, child)
    return root


def _label(n: Node) -> str:
    facts = "  ".join(f"{k}={v}" for k, v in n.details.items() if v)
    return f"{n.label}  [dim]{facts}[/dim]" if facts else n.label


def render_html(up: Node, down: Node, title: str) -> str:
    """A self-contained HTML page with both trees (logged as an MLflow artifact)."""

    def ul(n: Node) -> str:
        facts = "".join(
            f"<br><small>{html.escape(k)}: <code>{html.escape(v)}</code></small>"
            for k, v in n.details.items()
            if v
        )
        kids = "".join(ul(c) for c in n.children)
        return f"<li><b>{html.escape(n.label)}</b>{facts}{f'<ul>{kids}</ul>' if kids else ''}</li>"

    style = "body{font-family:sans-serif;margin:2em}li{margin:.4em 0}code{background:#f3f3f3}"
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<h2>Upstream: what made it</h2><ul>{ul(up)}</ul>"
        f"<h2>Downstream: what was made from it</h2><ul>{ul(down)}</ul></body></html>"
    )
