"""Run one training stage as a Ray Train ``TorchTrainer`` whose workers use DeepSpeed.

The driver (here) checks every input before a worker starts (dataset builds exist and verify,
tokenizer hashes agree, the init checkpoint matches the stage's model), computes the stage identity,
reuses a finished stage and hands the workers a ``StagePlan`` (``stage_plan.py``). Workers
(``stage_worker.py``) build the model, resume from the latest DeepSpeed checkpoint, stream the shards
and train; rank 0 logs metrics to MLflow after each checkpoint and writes the consolidated checkpoint
(``final/``) in the checkpoint layout of ``model/checkpoint.py``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tasks.core.identity import (
    atomic_write_json,
    code_version,
    hash_json,
    read_json,
    sha256_file,
)
from tasks.data.build import make_context, verify_build
from tasks.data.specs import find_spec, load_spec
from tasks.quality.eval_index import index_for
from tasks.train.loader import LoaderConfig, Source
from tasks.train.recipes import Recipe, StageConfig, stage_dict
from tasks.train.stage_plan import (
    REPAIRED,
    StageError,
    StagePlan,
    check_checkpoints,
    loader_dict,
    read_metric_rows,
)
from tasks.train.stage_worker import train_worker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildRef:
    """A verified dataset build a stage reads."""

    spec: str
    """Spec name."""
    build_id: str
    """Build identity (the MLflow dataset digest)."""
    path: str
    """Build folder (the MLflow dataset source)."""
    kind: str
    """Dataset kind."""
    weight: float
    """Stage mixture weight."""
    tokenizer_hash: str | None
    """Tokenizer the shards were made with (text kind)."""
    tokenizer_path: str | None
    """Where that tokenizer is."""


@dataclass
class StageSummary:
    """What a retrain or ``mvlm train`` reports of one stage."""

    stage: str
    """Stage name."""
    stage_id: str
    """Stage identity."""
    reused: bool
    """True when a finished output of this identity already existed."""
    first_loss: float
    """Loss of the first step."""
    final_loss: float
    """Loss of the last step."""
    final: str
    """Final checkpoint folder."""
    evaluation: dict[str, float] | None = None
    """Held-out metrics, for the stages the recipe evaluates."""


@dataclass
class StageOutcome:
    """One stage that ran (or was reused): its plan, its ``stage.json`` manifest and its summary."""

    plan: StagePlan
    """The plan it ran with."""
    manifest: dict[str, Any]
    """The finished stage's manifest (``stage.json``)."""
    summary: StageSummary
    """What is reported."""


# --- driver side: checks and planning ------------------------------------------------------------


def resolve_builds(
    stage: StageConfig, data_root: Path, spec_dir: str | None = None, known: Mapping[str, str] | None = None
) -> list[BuildRef]:
    """The current verified build of every dataset of the stage; StageError names what is missing.

    ``known`` maps spec names to the build folders a retrain's data step just built or verified:
    those are read as they are, without fingerprinting their sources again.
    """
    refs = []
    for ds in stage.datasets:
        if known and ds.spec in known:
            where = Path(known[ds.spec])
        else:
            try:
                spec_path, _ = find_spec(ds.spec, spec_dir)
            except KeyError as err:
                raise StageError(f"stage {stage.name}: {err.args[0]}") from err
            where = make_context(spec_path, data_root, index_for(load_spec(spec_path), data_root)).out
        manifest = verify_build(where, deep=False)
        if manifest is None:
            raise StageError(
                f"stage {stage.name} reads dataset {ds.spec!r}, which has no finished build {where.name} "
                f"under {data_root}; run `mvlm data build {ds.spec}` first"
            )
        tok = manifest.get("tokenizer") or {}
        ref = BuildRef(
            ds.spec, manifest["build_id"], str(where), manifest["kind"], ds.weight, tok.get("hash"),
            tok.get("path"),
        )  # fmt: skip
        refs.append(ref)
    return refs


def sources(builds: list[BuildRef], split: str) -> tuple[Source, ...]:
    """Weighted loader sources (build x subset) of one split."""
    total = sum(b.weight for b in builds)
    out = []
    for build in builds:
        manifest = read_json(Path(build.path) / "manifest.json")
        for subset, weight in manifest["weights"].items():
            shards = [r for r in manifest["shards"] if r["split"] == split and r["subset"] == subset]
            if shards:
                paths = tuple(str(Path(build.path) / r["path"]) for r in shards)
                count = sum(r["samples"] for r in shards)
                out.append(
                    Source(f"{build.spec}/{subset}", build.kind, paths, count, build.weight / total * weight)
                )
    return tuple(out)


def check_tokenizer(stage: StageConfig, builds: list[BuildRef], tokenizer_path: str) -> None:
    """Every text build must have been tokenized with the model's tokenizer."""
    from model.tokenizer import load_tokenizer, tokenizer_hash

    model_hash = tokenizer_hash(load_tokenizer(tokenizer_path))
    for build in builds:
        if build.tokenizer_hash and build.tokenizer_hash != model_hash:
            raise StageError(
                f"stage {stage.name}: shards of {build.spec} were tokenized with tokenizer "
                f"{build.tokenizer_hash} "
                f"({build.tokenizer_path}) but the model's tokenizer is {model_hash} ({tokenizer_path}); "
                "rebuild the dataset with the model's tokenizer or start from a matching checkpoint"
            )


def check_init(stage: StageConfig, init_path: str, vocab: int) -> None:
    """The init checkpoint must have the stage model's language-model shape."""
    from model.checkpoint import load_config
    from model.config import VLMConfig, get_config

    row = get_config(stage.model)
    llm = row.llm if isinstance(row, VLMConfig) else row
    have = load_config(init_path)
    want = {"num_hidden_layers": llm.n_layer, "hidden_size": llm.hidden, "num_attention_heads": llm.n_head,
            "intermediate_size": llm.intermediate, "vocab_size": vocab}  # fmt: skip
    wrong = {k: (getattr(have, k), v) for k, v in want.items() if getattr(have, k) != v}
    if wrong:
        details = ", ".join(f"{k}: checkpoint {a} vs model {b}" for k, (a, b) in wrong.items())
        raise StageError(
            f"stage {stage.name}: checkpoint {init_path} does not match model {stage.model} ({details})"
        )


def total_steps(stage: StageConfig, train_samples: int) -> int:
    """Optimizer steps from max_steps, max_tokens or epochs."""
    if stage.max_steps:
        return stage.max_steps
    if stage.max_tokens:
        return max(1, stage.max_tokens // (stage.global_batch * stage.seq_len))
    return max(1, math.ceil(stage.epochs * train_samples / stage.global_batch))


def init_identity(init: dict[str, str]) -> str:
    """What the stage starts from, as part of its identity."""
    if init["kind"] == "checkpoint":
        weights = sorted(Path(init["path"]).glob("*.safetensors"))
        return hash_json([sha256_file(w) for w in weights]) if weights else init["path"]
    return init["kind"]


def loader_config(
    stage: StageConfig, builds: list[BuildRef], split: str, tokenizer_path: str
) -> LoaderConfig:
    """The loader of a stage for one split."""
    from model.config import VLMConfig, get_config

    row = get_config(stage.model)
    vision = row.vision if isinstance(row, VLMConfig) else None
    return LoaderConfig(
        sources=sources(builds, split),
        micro_batch=stage.micro_batch,
        seq_len=stage.seq_len,
        template=stage.template,
        tokenizer_path=tokenizer_path,
        image_size=vision.image_size if vision else 0,
        image_mode=row.image_aspect_ratio if isinstance(row, VLMConfig) else "pad",
        seed=stage.seed,
        shuffle_buffer=stage.shuffle_buffer,
        group_by_modality_length=stage.group_by_modality_length,
    )


def _init_tokenizer(init: dict[str, str]) -> str | None:
    """The start checkpoint's folder when it holds a tokenizer (a released model's or a stage's)."""
    from model.tokenizer import TOKENIZER_FILES

    folder = Path(init["path"]) if init["kind"] == "checkpoint" else None
    return str(folder) if folder and any((folder / f).is_file() for f in TOKENIZER_FILES) else None


def plan_stage(
    recipe: Recipe, stage: StageConfig, init: dict[str, str], data_root: Path, runs_root: Path,
    tokenizer_path: str | None = None, known_builds: Mapping[str, str] | None = None,
) -> tuple[StagePlan, list[BuildRef]]:  # fmt: skip
    """Check inputs and compute the stage's identity and plan (no MLflow run yet); ``known_builds``
    as in ``resolve_builds``."""
    from tasks.train.deepspeed_config import deepspeed_config

    builds = resolve_builds(stage, data_root, known=known_builds)
    tokenizer_path = (
        tokenizer_path
        or _init_tokenizer(init)
        or next((b.tokenizer_path for b in builds if b.tokenizer_path), None)
    )
    if tokenizer_path is None:
        raise StageError(
            f"stage {stage.name}: no tokenizer: start from a checkpoint or include a text dataset"
        )
    check_tokenizer(stage, builds, tokenizer_path)
    from model.tokenizer import load_tokenizer

    vocab = len(load_tokenizer(tokenizer_path))
    if init["kind"] == "checkpoint":
        check_init(stage, init["path"], vocab)
    loader = loader_config(stage, builds, "train", tokenizer_path)
    if not loader.sources:
        raise StageError(f"stage {stage.name}: the datasets have no train shards")
    steps = total_steps(stage, loader.total_samples)
    # The recipe is part of the identity: a stage's folder, lock and MLflow run (a child of that
    # recipe's retrain run) belong to one recipe, so equal stages of two recipes never share a run.
    identity = {"recipe": recipe.name, "stage": stage_dict(stage),
                "builds": {b.spec: b.build_id for b in builds},
                "init": init_identity(init), "code": code_version("trainer")}  # fmt: skip
    stage_id = hash_json(identity)
    out = runs_root / recipe.name / stage.name / stage_id
    import torch

    plan = StagePlan(recipe.name, stage_dict(stage), stage_id, str(out), init, tokenizer_path, steps,
                     loader_dict(loader), deepspeed_config(stage, torch.cuda.is_available()),
                     [asdict(b) for b in builds], "", "")  # fmt: skip
    return plan, builds


def finished_stage(out: Path) -> dict[str, Any] | None:
    """The stage manifest when the stage finished and its final checkpoint verifies."""
    manifest_path = out / "stage.json"
    if not manifest_path.is_file():
        return None
    manifest = read_json(manifest_path)
    weights = out / "final" / "model.safetensors"
    if weights.is_file() and sha256_file(weights) == manifest["final_sha256"]:
        return manifest
    log.warning("stage %s: final checkpoint missing or corrupt; training resumes", out)
    manifest_path.unlink()
    return None


# --- driver: run ---------------------------------------------------------------------------------


def run_stage(plan: StagePlan) -> dict[str, Any]:
    """Train the planned stage with Ray Train (resuming if it was interrupted); returns the stage manifest.

    A second process asking for the same stage identity waits for the first, then reuses its output.
    """
    from tasks.core.locks import exclusive

    with exclusive(plan.out.parent / f".{plan.stage_id}.lock"):
        return _run_stage_locked(plan)


def _run_stage_locked(plan: StagePlan) -> dict[str, Any]:
    import ray.train
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from tasks.core.parallel import ensure_ray

    if (done := finished_stage(plan.out)) is not None:
        log.info("stage %s %s finished before; reusing", plan.stage["name"], plan.stage_id)
        return done
    plan.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(plan.out / "plan.json", asdict(plan))
    check_checkpoints(plan)  # here, before the ranks load what this leaves in `latest`
    (plan.out / REPAIRED).touch()  # rank 0 repairs again only when Ray Train restarts the workers
    ensure_ray()
    stage = plan.stage
    log.info("stage %s: training %d steps on %d Ray Train workers (%s)", stage["name"], plan.total_steps,
             stage["num_workers"], plan.out)  # fmt: skip
    use_gpu = bool(stage["resources_per_worker"].get("GPU"))
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=asdict(plan),
        scaling_config=ScalingConfig(
            num_workers=stage["num_workers"],
            use_gpu=use_gpu,
            resources_per_worker=stage["resources_per_worker"],
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            storage_path=str(plan.out / "ray"),
            name="train",
            failure_config=FailureConfig(max_failures=stage.get("max_failures", 0)),
        ),
    )
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as err:
        raise StageError(f"stage {stage['name']} ({plan.stage_id}) failed: {_root_cause(err)}") from err
    return _finish(plan)


def _root_cause(err: BaseException) -> str:
    text = str(err)
    for marker in ("NonFiniteLossError:", "StageError:", "Error:"):
        if marker in text:
            return text[text.rindex(marker) :].strip().splitlines()[0]
    return text.strip().splitlines()[-1] if text.strip() else type(err).__name__


def _finish(plan: StagePlan) -> dict[str, Any]:
    weights = plan.out / "final" / "model.safetensors"
    if not weights.is_file():
        raise StageError(
            f"stage {plan.stage['name']}: training ended without a final checkpoint in {plan.out}"
        )
    rows = read_metric_rows(plan.out / "metrics.jsonl")
    manifest = {
        "recipe": plan.recipe, "stage": plan.stage["name"], "stage_id": plan.stage_id,
        "steps": plan.total_steps,
        "final": str(plan.out / "final"), "final_sha256": sha256_file(weights),
        "first_loss": rows[0]["loss"], "final_loss": rows[-1]["loss"], "builds": plan.builds,
        "init": plan.init, "mlflow_run_id": plan.mlflow_run_id,
    }  # fmt: skip
    atomic_write_json(plan.out / "stage.json", manifest)
    return manifest
