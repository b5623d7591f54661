"""DeepSpeed configs generated from a recipe stage and the templates in ``infra/deepspeed/``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tasks.core.nested import flatten
from tasks.train.recipes import StageConfig

TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "infra" / "deepspeed"


def deepspeed_config(stage: StageConfig, use_gpu: bool, template_dir: Path = TEMPLATE_DIR) -> dict[str, Any]:
    """The stage's ZeRO template with every ``"auto"`` filled from the recipe."""
    path = template_dir / f"zero{max(stage.zero_stage, 1)}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no DeepSpeed template {path} for ZeRO stage {stage.zero_stage}")
    config = json.loads(path.read_text())
    if stage.zero_stage == 0 or (stage.num_workers == 1 and stage.zero_stage in (1, 2)):
        # One rank: ZeRO-1/2 partition nothing; their copies of the gradients into flat buffers only
        # add work (benchmarks/train_step.py at the tiny size). ZeRO-3 stays: it can offload.
        config["zero_optimization"] = {"stage": 0}
    values = {
        "train_micro_batch_size_per_gpu": stage.micro_batch,
        "gradient_accumulation_steps": stage.grad_accum,
        "gradient_clipping": stage.optim.grad_clip,
    }
    for key, value in values.items():
        if config.get(key) == "auto":
            config[key] = value
    config["bf16"] = {"enabled": bool(stage.bf16 and use_gpu)}
    leftover = [k for k, v in flatten(config).items() if v == "auto"]
    if leftover:
        raise ValueError(f"{path}: no recipe value for {leftover}")
    return config
