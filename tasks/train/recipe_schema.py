"""The typed schema of a training recipe: an ordered list of stages, each with its optimizer,
datasets and resources; the dataclasses keep the defaults that recipe files (``recipes/*.yaml``,
read by ``tasks.train.recipe_files``) leave out."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

LATER = {"identity": "omit at default"}
"""Metadata of fields added after recipes had identities: ``stage_dict`` leaves them out while they
hold their default, so that existing stages keep their identities (and finished outputs)."""

StageName = Literal["llm-pretrain", "llm-sft", "vlm-align", "vlm-instruct"]
Part = Literal["llm", "projector", "vision"]
STAGE_ORDER: tuple[str, ...] = ("llm-pretrain", "llm-sft", "vlm-align", "vlm-instruct")


@dataclass(frozen=True)
class DatasetRef:
    """A dataset spec a stage reads, with its mixture weight."""

    spec: str
    """Dataset spec name (``data_specs/<spec>.yaml``)."""
    weight: float = 1.0
    """Mixture weight across the stage's datasets (normalised)."""


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on the language model's linear layers."""

    r: int = 128
    """Rank."""
    alpha: int = 256
    """Scaling numerator (scale = alpha / r)."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    """Names of the linear layers that get adapters."""


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup and cosine decay to ``min_lr``."""

    lr: float
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping."""
    warmup_steps: int = 0
    """Warmup steps (used when ``warmup_ratio`` is 0)."""
    warmup_ratio: float = 0.0
    """Warmup as a fraction of the stage's steps."""
    projector_lr: float | None = field(default=None, metadata=LATER)
    """Peak learning rate of the projector (the authors' ``mm_projector_lr``: 1e-3 beside the LLM's
    2e-5 in V2 pre-training); None: ``lr``. Its cosine ends at the same fraction ``min_lr / lr``."""
    vision_lr: float | None = field(default=None, metadata=LATER)
    """Peak learning rate of the vision tower when it trains; None: ``lr``."""


@dataclass(frozen=True)
class StageConfig:
    """One training stage."""

    name: StageName
    """Stage kind; stages run in recipe order."""
    model: str
    """Model config row (``model/config.py``), e.g. ``mobilellama-1.4b`` or ``mobilevlm-1.7b``."""
    datasets: tuple[DatasetRef, ...]
    """Dataset specs with mixture weights."""
    train: tuple[Part, ...]
    """Parts that train (``llm``, ``projector``, ``vision``); the vision tower is frozen unless named."""
    optim: OptimConfig
    """Optimizer and schedule."""
    global_batch: int
    """Samples (sequences) per optimizer step across all workers."""
    micro_batch: int
    """Samples per worker per forward pass."""
    seq_len: int
    """Maximum text tokens per sample (the authors' ``model_max_length``); an image adds its visual
    tokens after the text is cut, as the authors splice after truncating (2048 + 143 at 144 tokens)."""
    zero_stage: int
    """DeepSpeed ZeRO stage (0-3)."""
    epochs: float = 1.0
    """Passes over the stage's data (ignored when ``max_steps`` or ``max_tokens`` is set)."""
    max_steps: int | None = None
    """Fixed number of optimizer steps."""
    max_tokens: int | None = None
    """Token budget (pretraining: 1.3T tokens for MobileLLaMA)."""
    template: Literal["plain", "v1"] | None = None
    """Conversation template for image-text, instruct and chat data."""
    init: str | None = None
    """Start point: None = previous stage's output, ``scratch`` = random init, or a checkpoint path/hub id."""
    lora: LoraConfig | None = None
    """LoRA adapters instead of full LLM training (instruction tuning variant)."""
    enabled: bool = True
    """Optional stages (llm-sft) are off unless enabled."""
    num_workers: int = 1
    """Ray Train workers (one per GPU on a cluster)."""
    resources_per_worker: dict[str, float] = field(default_factory=lambda: {"CPU": 1})
    """Ray resources per worker, e.g. ``{"GPU": 1, "CPU": 8}``."""
    bf16: bool = False
    """bf16 mixed precision (GPUs)."""
    grad_checkpointing: bool = False
    """Recompute activations in backward."""
    group_by_modality_length: bool = False
    """Form micro-batches of one modality and similar length (LLaVA's ``group_by_modality_length``)."""
    checkpoint_every: int = 100
    """Optimizer steps between checkpoints (and metric flushes)."""
    max_failures: int = field(default=0, metadata=LATER)
    """Times Ray Train restarts the workers after one of them (or its node) is lost, each time from the
    last checkpoint; a restart waits for room for every worker (the node back, or another one). 0: the
    stage fails and a rerun of the retrain resumes it (an error in the training code also counts as a
    failure: it is retried too). A value other than 0 is part of the stage identity, so set it before
    the stage first runs."""
    loader_workers: int = 0
    """DataLoader worker processes per Ray worker."""
    shuffle_buffer: int = 256
    """Samples in the shuffle buffer of each stream."""
    seed: int = 0
    """Seed for init, data order and dropout."""
    peak_flops: float | None = None
    """Peak FLOP/s per worker for MFU (None: detected, e.g. 312e12 for an A100 in bf16)."""
    eval_samples: int = 200
    """Held-out samples used by the evaluation step after this stage."""

    @property
    def grad_accum(self) -> int:
        """Gradient accumulation steps so that workers x micro_batch x accum = global_batch."""
        per_step = self.num_workers * self.micro_batch
        if self.global_batch % per_step:
            raise ValueError(
                f"stage {self.name}: global_batch {self.global_batch} is not a multiple of "
                f"num_workers x micro_batch = {per_step}"
            )
        return self.global_batch // per_step


@dataclass(frozen=True)
class Gate:
    """What a retrain's model must score to become the champion. Scores are the benchmarks' headline
    figures (percent; MME perception out of 2000); drops are in points, MME counted as score / 20 as
    in the papers' average, so that one threshold means the same on every set."""

    min_scores: dict[str, float] = field(default_factory=dict)
    """Evaluation set name (or ``average``: the papers' average of all six) -> lowest headline that
    passes, for the PyTorch model."""
    max_drop_vs_champion: float | None = None
    """Largest drop, on any set, of the PyTorch model against the current champion (None: no check)."""
    max_quant_drop: float | None = None
    """Largest drop, on any set, from the PyTorch model to each quantization (None: no check)."""


MODEL_NAMES = {
    "llm-pretrain": "mobilellama-base",
    "llm-sft": "mobilellama-chat",
    "vlm-align": "mobilevlm-aligned",
    "vlm-instruct": "mobilevlm-instruct",
}
"""Default registered model names of the stages' outputs (``<recipe>-<name>``)."""


@dataclass(frozen=True)
class Recipe:
    """A named end-to-end training recipe."""

    name: str
    """Row name."""
    description: str
    """What it reproduces."""
    stages: tuple[StageConfig, ...]
    """Stages in order."""
    quant_types: tuple[str, ...] = ("q4_k_s", "q8_0")
    """llama.cpp types a retrain quantizes to by default (the paper's 4-bit q4_k_s and q8_0)."""
    evaluate: tuple[str, ...] = ("llm-pretrain", "vlm-instruct")
    """Stages whose output is evaluated on their datasets' held-out split."""
    model_names: dict[str, str] = dataclasses.field(default_factory=lambda: dict(MODEL_NAMES))
    """Registered model name (after ``<recipe>-``) of each stage's output."""
    question_types: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    """Question type -> regular expressions an evaluated question (without its image token) fully
    matches; the instruction evaluation reports an accuracy per type beside the overall one."""
    eval_sets: tuple[str, ...] = ()
    """Evaluation specs (``eval_specs/``) the final model and every quantization answer in a retrain."""
    gate: Gate = Gate()
    """Thresholds on those scores that decide whether the retrain's models become the champion."""

    def stage(self, name: str) -> StageConfig:
        """The stage called ``name``."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"recipe {self.name} has no stage {name!r}; stages: {[s.name for s in self.stages]}")

    def enabled_stages(self) -> list[StageConfig]:
        """Stages that run, in order."""
        return [s for s in self.stages if s.enabled]

    def stages_to_retrain(self, from_stage: str | None, force: Sequence[str] = ()) -> tuple[str, ...]:
        """Enabled stages to retrain even when finished: ``from_stage`` and every later one, plus ``force``.

        A name that is not an enabled stage of this recipe is refused (a typo must not retrain nothing).
        """
        names = [s.name for s in self.enabled_stages()]
        for flag, name in [("--from", from_stage), *(("--force", f) for f in force)]:
            if name is not None and name not in names:
                raise ValueError(
                    f"{flag} {name!r}: recipe {self.name} has no enabled stage of that name; "
                    f"its stages are {names} (`mvlm recipes` lists them)"
                )
        start = names.index(from_stage) if from_stage is not None else len(names)
        return tuple(n for i, n in enumerate(names) if i >= start or n in force)

    def model_name(self, stage_or_quant: str) -> str:
        """Registered model name of a stage output (``tiny-mobilevlm-instruct``) or of a quantization
        (``tiny-gguf-q8_0``)."""
        if stage_or_quant in self.model_names:
            return f"{self.name}-{self.model_names[stage_or_quant]}"
        return f"{self.name}-gguf-{stage_or_quant}"


def stage_dict(stage: StageConfig) -> dict[str, Any]:
    """A stage as plain data (for identities and MLflow params); ``LATER`` fields at their default are
    left out."""
    return _plain(stage)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _plain(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if not (f.metadata.get("identity") == LATER["identity"] and getattr(value, f.name) == f.default)
        }
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
