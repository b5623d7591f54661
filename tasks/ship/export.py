"""Export a checkpoint to GGUF (language model + mmproj), with an identity, a manifest and checks.

The export folder holds ``model-<dtype>.gguf`` (LLaMA GGUF with the tokenizer), for a VLM
``mmproj-<dtype>.gguf`` (vision tower + projector), and ``manifest.json`` written last with the
identity and the sha256 of every file. A folder whose manifest carries the same identity and
whose files verify is reused as is.

Checks (``tasks/ship/export_checks.py``; each logged and kept in the manifest when run through
``export_checkpoint(check=True)``): f32 GGUF logits, mmproj image embeddings and greedy multimodal
answers, llama.cpp against PyTorch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.core.identity import (
    atomic_path,
    atomic_write_json,
    code_version,
    hash_json,
    read_json,
    sha256_file,
)
from tasks.core.settings import get_settings
from tasks.ship.export_checks import check_image_embeddings, check_logits, check_multimodal_agreement

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


class ExportError(ValueError):
    """A checkpoint that cannot be exported as asked."""


@dataclass(frozen=True)
class ExportConfig:
    """What an export writes."""

    llm_dtype: str = "f16"
    """Storage type of the language model's matrices: ``f16`` (what llama.cpp quantizes from) or ``f32``."""
    mmproj_dtype: str = "f16"
    """Storage type of the mmproj's matrices (convolutions are always f16, as llama.cpp needs)."""


@dataclass
class ExportResult:
    """Where an export lives and what it holds."""

    export_id: str
    """Identity: hash of the checkpoint fingerprint, the export config and the exporter version."""
    out_dir: Path
    """The export folder."""
    llm: Path
    """Language-model GGUF."""
    mmproj: Path | None
    """mmproj GGUF (None for a language-model-only checkpoint)."""
    reused: bool
    """True when a verified export with this identity already existed."""
    checks: dict[str, Any] = field(default_factory=dict)
    """Results of the checks that ran."""


# --- manifests (shared with tasks.ship.quantize) -----------------------------------------------------


def write_manifest(folder: Path, kind: str, identity: str, inputs: dict[str, Any], **extra: Any) -> dict:
    """Write ``manifest.json`` last: identity, inputs and the sha256 of every other file in ``folder``."""
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    manifest = {"kind": kind, "id": identity, "inputs": inputs, "files": files, **extra}
    atomic_write_json(folder / MANIFEST, manifest)
    return manifest


def verified_manifest(folder: Path, identity: str) -> dict | None:
    """The manifest of ``folder`` when it names ``identity`` and every listed file matches its sha256."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = read_json(path)
    except json.JSONDecodeError:
        log.warning("%s is not valid JSON; rebuilding", path)
        return None
    if manifest.get("id") != identity:
        log.info("%s holds %s, not %s; rebuilding", folder, manifest.get("id"), identity)
        return None
    for name, digest in manifest.get("files", {}).items():
        if not (folder / name).is_file() or sha256_file(folder / name) != digest:
            log.warning("%s/%s is missing or changed; rebuilding", folder, name)
            return None
    return manifest


# --- export -------------------------------------------------------------------------------------


def checkpoint_fingerprint(checkpoint: Path) -> dict[str, str]:
    """sha256 of every file of a checkpoint directory (config, weights, tokenizer)."""
    return {p.name: sha256_file(p) for p in sorted(checkpoint.iterdir()) if p.is_file()}


def _validate_checkpoint(checkpoint: Path) -> None:
    if not checkpoint.is_dir():
        raise ExportError(
            f"checkpoint {checkpoint} is not a directory; pass a folder written by model.save()"
        )
    if not (checkpoint / "config.json").is_file():
        raise ExportError(
            f"checkpoint {checkpoint} has no config.json; pass a folder written by model.save()"
        )
    if not any((checkpoint / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise ExportError(
            f"checkpoint {checkpoint} has no tokenizer.json (or tokenizer.model): the GGUF must carry the "
            "tokenizer; save the checkpoint with model.save(module, path, tokenizer=tok) or copy "
            "tokenizer.json in"
        )


def export_identity(fingerprint: dict[str, str], config: ExportConfig) -> str:
    """Identity of an export."""
    return hash_json(
        {"checkpoint": fingerprint, "config": dataclasses.asdict(config), "code": code_version("exporter")}
    )


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path | None = None,
    config: ExportConfig | None = None,
    check: bool = False,
) -> ExportResult:
    """Export ``checkpoint`` to GGUF in ``out_dir`` (default ``<runs_root>/export/<export_id>``)."""
    checkpoint, config = Path(checkpoint), config or ExportConfig()
    _validate_checkpoint(checkpoint)
    fingerprint = checkpoint_fingerprint(checkpoint)
    export_id = export_identity(fingerprint, config)
    out = Path(out_dir) if out_dir else get_settings().runs_root / "export" / export_id
    manifest = verified_manifest(out, export_id)
    reused = manifest is not None
    if manifest is None:
        with atomic_path(out) as tmp:
            tmp.mkdir()
            files = _write_ggufs(checkpoint, tmp, config, export_id)
            inputs = {"checkpoint": str(checkpoint.resolve()), "fingerprint": fingerprint}
            manifest = write_manifest(
                tmp, "export", export_id, inputs, config=dataclasses.asdict(config), **files
            )
        log.info("exported %s/%s to GGUF: %s", checkpoint.parent.parent.name, checkpoint.parent.name, out)
    else:
        log.info("export %s already in %s and verified; reusing", export_id, out)
    result = _result(out, manifest, reused)
    if check:
        recorded = manifest.get("checks") if reused else None
        result.checks = recorded or run_checks(checkpoint, result)
    return result


def _result(out: Path, manifest: dict, reused: bool) -> ExportResult:
    mmproj = manifest.get("mmproj")
    return ExportResult(manifest["id"], out, out / manifest["llm"], out / mmproj if mmproj else None, reused)


def _write_ggufs(
    checkpoint: Path, folder: Path, config: ExportConfig, export_id: str
) -> dict[str, str | None]:
    from model.checkpoint import load_config, read_state_dict
    from model.gguf_export import write_llm_gguf, write_mmproj_gguf
    from model.gguf_vocab import checkpoint_vocab
    from model.image import CLIP_MEAN, CLIP_STD

    hf_config = load_config(checkpoint)
    state = read_state_dict(checkpoint)
    vocab = checkpoint_vocab(checkpoint, hf_config.vocab_size)
    extra = {"mvlm.export_id": export_id, "mvlm.exporter": code_version("exporter")}  # GGUF metadata keys
    llm = f"model-{config.llm_dtype}.gguf"
    write_llm_gguf(state, hf_config, vocab, folder / llm, config.llm_dtype, extra)  # type: ignore[arg-type]
    if not hf_config.is_multimodal:
        return {"llm": llm, "mmproj": None}
    if not hf_config.vision_config:  # the authors' checkpoints name the tower by hub id only
        from model.mobilevlm import vision_row
        from model.vision import clip_config

        hf_config.vision_config = clip_config(vision_row(hf_config)).to_dict()
    mmproj = f"mmproj-{config.mmproj_dtype}.gguf"
    write_mmproj_gguf(state, hf_config, folder / mmproj, CLIP_MEAN, CLIP_STD, config.mmproj_dtype, extra)  # type: ignore[arg-type]
    return {"llm": llm, "mmproj": mmproj}


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch with ``n`` intra-op threads inside the block (restored after)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_checks(checkpoint: Path, result: ExportResult, threads: int = 1) -> dict[str, Any]:
    """Run the checks that apply (torch and llama.cpp on ``threads`` threads), log each, record them."""
    with torch_threads(threads):
        return _run_checks(checkpoint, result)


def _run_checks(checkpoint: Path, result: ExportResult) -> dict[str, Any]:
    checks: dict[str, Any] = {"logits": dataclasses.asdict(check_logits(checkpoint, result.llm))}
    log.debug("check logits: %s", checks["logits"])
    if result.mmproj is not None:
        checks["image_embeddings"] = dataclasses.asdict(
            check_image_embeddings(checkpoint, result.llm, result.mmproj)
        )
        log.debug("check image embeddings: %s", checks["image_embeddings"])
        agreement = check_multimodal_agreement(checkpoint, result.llm, result.mmproj)
        checks["multimodal_agreement"] = {
            k: v for k, v in dataclasses.asdict(agreement).items() if k != "answers"
        }
        log.debug("check multimodal agreement: %s", checks["multimodal_agreement"])
    manifest = read_json(result.out_dir / MANIFEST)
    atomic_write_json(result.out_dir / MANIFEST, {**manifest, "checks": checks})
    return checks
