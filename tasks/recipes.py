"""Named training recipes: one row per recipe, each an ordered list of stages.

The real rows carry the paper's hyperparameters (arXiv 2312.16886 and the authors' scripts; see
``shared/reference/mobilevlm-facts.md``). ``tiny`` is ours: the same three stages on the tiny specs,
small enough for a 2-core CPU in a few minutes; ``tiny-v2`` is ``tiny`` with the V2 projector (LDPv2).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

StageName = Literal["llm-pretrain", "llm-sft", "vlm-align", "vlm-instruct"]
Part = Literal["llm", "projector"]
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
    """Parts that train; the vision tower is always frozen."""
    optim: OptimConfig
    """Optimizer and schedule."""
    global_batch: int
    """Samples (sequences) per optimizer step across all workers."""
    micro_batch: int
    """Samples per worker per forward pass."""
    seq_len: int
    """Maximum sequence length in tokens (visual tokens included)."""
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
class Recipe:
    """A named end-to-end training recipe."""

    name: str
    """Row name."""
    description: str
    """What it reproduces."""
    stages: tuple[StageConfig, ...]
    """Stages in order."""

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


def _paper(
    size: str, llm: str, vlm: str, sft_lr: float, sft_epochs: int, it_lr: float, zero_it: int
) -> Recipe:
    """The paper's recipe for one size (to start from the released base model instead of pretraining,
    disable llm-pretrain and set vlm-align's ``init`` to ``mtgv/MobileLLaMA-<size>-Base``)."""
    pretrain = StageConfig(
        "llm-pretrain", llm, (DatasetRef("redpajama-v1"),), ("llm",),
        OptimConfig(3e-4, 3e-5, (0.9, 0.95), 0.1, 1.0, warmup_steps=2000),
        global_batch=2560, micro_batch=16, seq_len=2048, zero_stage=1, max_tokens=1_300_000_000_000,
        init="scratch", num_workers=160, resources_per_worker={"GPU": 1, "CPU": 8}, bf16=True,
        checkpoint_every=1000, peak_flops=312e12,
    )  # fmt: skip
    sft = StageConfig(
        "llm-sft", llm, (DatasetRef("sharegpt"),), ("llm",), OptimConfig(sft_lr, 0.0, weight_decay=0.0),
        global_batch=128, micro_batch=4, seq_len=2048, zero_stage=2, epochs=sft_epochs, template="v1",
        enabled=False, num_workers=8, resources_per_worker={"GPU": 1, "CPU": 8}, bf16=True, peak_flops=312e12,
    )  # fmt: skip
    align = StageConfig(
        "vlm-align", vlm, (DatasetRef("llava-pretrain-558k"),), ("projector",),
        OptimConfig(1e-3, 0.0, warmup_ratio=0.03), global_batch=256, micro_batch=32, seq_len=2048,
        zero_stage=2, epochs=1, template="plain", num_workers=8,
        resources_per_worker={"GPU": 1, "CPU": 8}, bf16=True, grad_checkpointing=True, peak_flops=312e12,
    )  # fmt: skip
    instruct = StageConfig(
        "vlm-instruct", vlm, (DatasetRef("llava-v1.5-mix665k"),), ("projector", "llm"),
        OptimConfig(it_lr, 0.0, warmup_ratio=0.03), global_batch=128, micro_batch=16, seq_len=2048,
        zero_stage=zero_it, epochs=1, template="v1", num_workers=8, resources_per_worker={"GPU": 1, "CPU": 8},
        bf16=True, grad_checkpointing=True, group_by_modality_length=True, peak_flops=312e12,
    )  # fmt: skip
    about = f"MobileVLM {size}: MobileLLaMA pretraining, alignment, instruction tuning"
    return Recipe(f"mobilevlm-{size}", about, (pretrain, sft, align, instruct))


def _tiny() -> Recipe:
    """Ours. Tuned on the 2400-image sample set: 144 visual tokens need seq_len 320 for multi-round
    answers to survive truncation; held-out accuracy then reaches ~0.85 colour and ~0.65 shape."""
    common: dict[str, Any] = {"num_workers": 2, "micro_batch": 8, "global_batch": 16, "checkpoint_every": 20}
    pretrain = StageConfig(
        "llm-pretrain", "tiny-llama", (DatasetRef("tiny-redpajama"),), ("llm",),
        OptimConfig(3e-3, 3e-4, (0.9, 0.95), 0.1, 1.0, warmup_steps=10), seq_len=128, zero_stage=1,
        epochs=3, init="scratch", **common,
    )  # fmt: skip
    sft = StageConfig(
        "llm-sft", "tiny-llama", (DatasetRef("tiny-sharegpt"),), ("llm",), OptimConfig(1e-3, 1e-4),
        seq_len=256, zero_stage=2, epochs=2, template="v1", enabled=False, **common,
    )  # fmt: skip
    align = StageConfig(
        "vlm-align", "mobilevlm-tiny-336",
        (DatasetRef("tiny-llava-pretrain", 1.0), DatasetRef("tiny-cc3m", 1.0)),
        ("projector",), OptimConfig(2e-3, 2e-4, warmup_ratio=0.03), seq_len=256, zero_stage=2, epochs=0.5,
        template="plain", **common,
    )  # fmt: skip
    instruct = StageConfig(
        "vlm-instruct", "mobilevlm-tiny-336", (DatasetRef("tiny-llava-instruct"),), ("projector", "llm"),
        OptimConfig(1e-3, 1e-4, warmup_ratio=0.03), seq_len=320, zero_stage=2, epochs=4, template="v1",
        group_by_modality_length=True, **common,
    )  # fmt: skip
    return Recipe(
        "tiny",
        "The three stages on the tiny specs, for CPU tests and the demo",
        (pretrain, sft, align, instruct),
    )


def _tiny_v2() -> Recipe:
    """Ours: ``tiny`` with MobileVLM V2's projector (LDPv2: Linear-GELU-Linear, average pooling to the
    same 12x12 = 144 visual tokens, a depthwise-conv positional encoding). The datasets and the
    language-model stages are ``tiny``'s, so the two recipes share their dataset builds (stages belong
    to their recipe: each trains its own llm-pretrain, with equal settings)."""
    tiny = _tiny()
    stages = tuple(
        dataclasses.replace(s, model="mobilevlm-v2-tiny-336") if s.name.startswith("vlm-") else s
        for s in tiny.stages
    )
    return Recipe("tiny-v2", "The tiny recipe with the MobileVLM V2 projector (LDPv2)", stages)


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in [
        _paper("1.7b", "mobilellama-1.4b", "mobilevlm-1.7b", 2e-5, 3, 2e-5, 2),
        _paper("3b", "mobilellama-2.7b", "mobilevlm-3b", 3e-5, 2, 4e-5, 3),
        _tiny(),
        _tiny_v2(),
    ]
}


def get_recipe(name: str, **stage_overrides: dict[str, Any]) -> Recipe:
    """The recipe ``name``; ``stage_overrides`` maps a stage name to field overrides."""
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r}; known recipes: {', '.join(sorted(RECIPES))}")
    recipe = RECIPES[name]
    if not stage_overrides:
        return recipe
    stages = tuple(dataclasses.replace(s, **stage_overrides.get(s.name, {})) for s in recipe.stages)
    return dataclasses.replace(recipe, stages=stages)


def stage_dict(stage: StageConfig) -> dict[str, Any]:
    """A stage as plain data (for identities and MLflow params)."""
    return dataclasses.asdict(stage)
