"""Every ``mvlm.*`` MLflow tag the pipeline writes or reads: the vocabulary of its lineage.

Runs are found by these tags (``IDENTITY`` makes every push idempotent, ``MODEL_VERSION`` and
``RUN_ID`` drive the lineage graph), so a name lives here once and every module imports it.
"""

from __future__ import annotations

IDENTITY = "mvlm.identity"
"""Identity of the result a run records (a build, stage, export, quant or benchmark id)."""
KIND = "mvlm.kind"
"""What a run records: retrain, build, stage, evaluation, export, quant, device-bench."""
COMPLETE = "mvlm.push_complete"
"""``"true"`` once every part of a pushed payload is in MLflow (a run without it is unfinished)."""
OWNER = "mvlm.pushed_by"
"""Who created a pushed run (host and outbox): a pusher only cleans up runs it created."""
SHA_PREFIX = "mvlm.sha256."
"""``mvlm.sha256.<file>``: the sha256 of an artifact (checked when it is fetched back)."""
CODE_COMMIT = "mvlm.code_commit"
"""Git commit of the pipeline code that made the run."""
STOPPED_AFTER = "mvlm.stopped_after"
"""On a retrain run: the step after which a ``--until`` or a failure stopped it."""
CHECKPOINT_LOGGED = "mvlm.checkpoint_logged"
"""On a stage run: the final checkpoint is logged as artifacts."""

RECIPE = "mvlm.recipe"
"""Recipe name."""
SPEC = "mvlm.spec"
"""Dataset spec name (build runs)."""
STAGE = "mvlm.stage"
"""Stage name (stage runs)."""
STAGE_ID = "mvlm.stage_id"
"""Stage identity an evaluation run evaluates."""

MODEL_VERSION = "mvlm.model_version"
"""``name/version`` of the registered model a run produced or measured."""
RUN_ID = "mvlm.run_id"
"""On a model version: the run that made it (lineage walks from here)."""
PARENT_MODEL = "mvlm.parent_model"
"""On a model version: the version it was trained from (empty for a root)."""
DATASETS = "mvlm.datasets"
"""On a model version: JSON ``{spec: build id}`` of the data it saw."""
RETRAIN_RUN_ID = "mvlm.retrain_run_id"
"""On a model version: the retrain run it belongs to."""

EXPORT_ID = "mvlm.export_id"
"""Identity of a GGUF export."""
QUANT_TYPE = "mvlm.quant_type"
"""llama.cpp quantization type (q4_k_s, q8_0, ...)."""
QUANT_ID = "mvlm.quant_id"
"""Identity of a quantized GGUF."""
QUANT_RUN_ID = "mvlm.quant_run_id"
"""On a benchmark run: the quant run it measured."""
MODEL = "mvlm.model"
"""Model row or checkpoint a quant came from."""
LLM_FILE = "mvlm.llm_file"
"""File name of the language-model GGUF in a quant run's artifacts."""
MMPROJ_FILE = "mvlm.mmproj_file"
"""File name of the vision projector GGUF (VLMs only)."""
LLAMA_CPP_BUILD = "mvlm.llama_cpp_build"
"""llama.cpp build number that quantized or measured."""


def search(tag: str, value: str) -> str:
    """An MLflow ``filter_string`` matching runs whose ``tag`` equals ``value``."""
    return f"tags.`{tag}` = '{value}'"
