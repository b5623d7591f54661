"""Where a stage starts when the recipe's ``init`` or ``mvlm retrain --init STAGE=...`` names a
checkpoint: a local folder, or a hub model id (``owner/name`` or ``owner/name@revision``, e.g. the
released ``mtgv/MobileLLaMA-1.4B-Chat``) downloaded once into ``<runs root>/hub`` at a pinned commit.

The resolved folder (its path holds the commit for a hub model) goes into the stage's plan, its
weights into the stage identity, and both into the stage's MLflow run (``mvlm.init`` tags).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from tasks.train.recipe_schema import Recipe

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")
"""``owner/name`` with an optional ``@revision`` (branch, tag or commit)."""
HUB_FILES = [
    "config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
    "pytorch_model*.bin", "pytorch_model.bin.index.json", "tokenizer*", "special_tokens_map.json",
]  # fmt: skip
"""What a checkpoint needs from a model repository (no optimizer states, no other formats)."""


class InitError(ValueError):
    """A stage start point that is neither a checkpoint folder nor a reachable hub model."""


def resolve_init(value: str, runs_root: Path) -> str:
    """The local checkpoint folder ``value`` names (downloaded when it is a hub id)."""
    path = Path(value).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if not HUB_ID.fullmatch(value) or value.startswith(("/", ".", "~")):
        raise InitError(
            f"init {value!r} is neither a checkpoint folder nor a hub model id (owner/name[@revision])"
        )
    from huggingface_hub import snapshot_download

    repo, _, revision = value.partition("@")
    try:
        folder = snapshot_download(
            repo, revision=revision or None, allow_patterns=HUB_FILES, cache_dir=str(runs_root / "hub"),
            endpoint=os.environ.get("HF_ENDPOINT") or None,  # read now, not when huggingface_hub was imported
        )  # fmt: skip
    except Exception as err:  # network, auth, missing repo or revision: our message, theirs in the log
        log.debug("snapshot_download(%s): %s: %s", value, type(err).__name__, err)
        raise InitError(
            f"cannot fetch model {value} from the hub ({type(err).__name__}); check the id and revision, "
            "or download it on a machine that reaches the hub and pass its folder instead"
        ) from None
    log.info("init %s: %s", value, folder)
    return folder


def parse_inits(values: list[str], recipe: Recipe) -> dict[str, str]:
    """``STAGE=PATH_OR_HUB_ID`` options as {stage: start point}; InitError names a bad one."""
    names = [s.name for s in recipe.enabled_stages()]
    out: dict[str, str] = {}
    for value in values:
        stage, sep, where = value.partition("=")
        if not sep or not where:
            raise InitError(f"--init {value!r}: expected STAGE=PATH_OR_HUB_ID, e.g. vlm-align=owner/model")
        if stage not in names:
            raise InitError(
                f"--init {value!r}: recipe {recipe.name} has no enabled stage {stage!r}; stages: {names}"
            )
        out[stage] = where
    return out
