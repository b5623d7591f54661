"""Checkpoint directories: ``config.json`` + safetensors weights, in the authors' layout.

A checkpoint written here loads in transformers (``LlamaForCausalLM.from_pretrained`` reads the
language part) and in LLaVA/MobileVLM code. Loading never unpickles: safetensors files, or
``torch.load(weights_only=True)`` for the authors' ``pytorch_model*.bin`` shards.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.mobilevlm import MobileLlamaForCausalLM, MobileVLMConfig

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
# Buffers that older transformers versions saved and current modules recompute.
_LEGACY_BUFFERS = ("rotary_emb.inv_freq", "embeddings.position_ids")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded as asked."""


def save_checkpoint(model: MobileLlamaForCausalLM, path: str | Path, tokenizer: Any | None = None) -> Path:
    """Write ``model`` (and optionally its tokenizer) to ``path`` atomically: temp dir, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        # One metadata key only: safetensors writes metadata from a hash map in random order, so a
        # second key would make equal weights give different file bytes (and stage identities).
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / "config.json").write_text(
            json.dumps(checkpoint_config(model.config), indent=2, sort_keys=True)
        )
        if tokenizer is not None:
            from model.tokenizer import save_tokenizer

            save_tokenizer(tokenizer, tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("saved checkpoint %s (%d tensors)", path, len(state))
    return path


def checkpoint_config(config: MobileVLMConfig) -> dict[str, Any]:
    """config.json content: LLaVA/MobileVLM keys for a VLM, a plain LLaMA config for a language model."""
    data = config.to_dict()
    if config.is_multimodal:
        data.update(model_type="mobilevlm", architectures=["MobileLlamaForCausalLM"])
    else:
        data = {k: v for k, v in data.items() if not k.startswith(("mm_", "vision_config", "image_aspect"))}
        data.update(model_type="llama", architectures=["LlamaForCausalLM"])
    return data


def load_config(path: str | Path) -> MobileVLMConfig:
    """Read a checkpoint's config.json (ours, the authors', or a plain LLaMA one)."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{path} is not a checkpoint directory: {file.name} is missing")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file}: invalid JSON ({err})") from err
    for key in ("model_type", "architectures", "transformers_version"):
        data.pop(key, None)
    return MobileVLMConfig(**data)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, from safetensors (single or sharded) or .bin shards."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if files:
        state: dict[str, torch.Tensor] = {}
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                state.update({k: handle.get_tensor(k) for k in handle.keys()})  # noqa: SIM118
        return state
    bins = sorted(path.glob("pytorch_model*.bin"))
    if bins:
        state = {}
        for file in bins:
            state.update(torch.load(file, map_location="cpu", weights_only=True))
        return state
    raise CheckpointError(f"{path}: no *.safetensors or pytorch_model*.bin weights found")


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> MobileLlamaForCausalLM:
    """Build the model that ``path/config.json`` describes and load its weights strictly."""
    config = load_config(path)
    state = {k: v for k, v in read_state_dict(path).items() if not k.endswith(_LEGACY_BUFFERS)}
    with torch.device(device):
        model = MobileLlamaForCausalLM(config)
    check_keys(model, state, path)
    model.load_state_dict(state, strict=True)
    if dtype is not None:
        model.to(dtype)
    model.eval()
    return model


def check_keys(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Raise CheckpointError naming missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = [
            _listing("missing keys", missing),
            _listing("unexpected keys", unexpected),
            _listing("shape mismatches", shapes),
        ]
        details = "; ".join(p for p in parts if p)
        raise CheckpointError(f"checkpoint {path} does not match its config: {details}")


def _listing(label: str, items: list[str], limit: int = 8) -> str:
    if not items:
        return ""
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return f"{len(items)} {label}: {', '.join(items[:limit])}{more}"
