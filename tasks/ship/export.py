"""Export a checkpoint to GGUF (language model + mmproj), with an identity, a manifest and checks.

The export folder holds ``model-<dtype>.gguf`` (LLaMA GGUF with the tokenizer), for a VLM
``mmproj-<dtype>.gguf`` (vision tower + projector), and ``manifest.json`` written last with the
identity and the sha256 of every file. A folder whose manifest carries the same identity and
whose files verify is reused as is.

Checks (each logged and kept in the manifest when run through ``export_checkpoint(check=True)``):
``check_logits`` (f32 GGUF logits vs PyTorch on the same tokens), ``check_image_embeddings``
(llama.cpp's mmproj output vs PyTorch) and ``check_multimodal_agreement`` (greedy answers through
llama.cpp vs PyTorch on held-out questions about generated images).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Iterator, Sequence
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

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CHECK_TEXT = "A red fox in the snow. What is in the picture? It is a small dog on the grass."
"""Prompt of the logits check (any text works; the tiny tokenizer covers these words)."""
HELD_OUT_QUESTIONS: tuple[str, ...] = (
    "What color is the square?",
    "What is in the picture?",
    "Describe the image.",
    "What do you see?",
)
"""Questions of the multimodal agreement check (not used when training the tiny test model)."""


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


# --- checks -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogitCheck:
    """PyTorch vs llama.cpp logits on one prompt."""

    n_tokens: int
    """Prompt length."""
    max_abs_diff: float
    """Largest absolute logit difference over all positions and the vocabulary."""
    logit_scale: float
    """Largest absolute PyTorch logit (for reading the difference)."""
    argmax_agreement: float
    """Fraction of positions whose top token agrees."""
    tokenizer_agrees: bool
    """Whether llama.cpp tokenises the prompt to the same ids as our tokenizer."""


def _torch_model(checkpoint: Path) -> Any:
    import model

    return model.load(checkpoint).float().eval()


def check_logits(checkpoint: Path, gguf_path: Path, text: str = CHECK_TEXT, threads: int = 1) -> LogitCheck:
    """Logits of the GGUF through llama.cpp (f32 KV cache) against our PyTorch model on the same ids."""
    import numpy as np
    import torch

    from model.tokenizer import load_tokenizer
    from tasks.ship.llama_cpp import LlamaCpp, RuntimeOptions

    ids = load_tokenizer(checkpoint)(text)["input_ids"]
    with torch.no_grad():
        ours = _torch_model(checkpoint)(torch.tensor([ids])).logits[0].numpy()
    with LlamaCpp(
        gguf_path, RuntimeOptions(n_ctx=max(64, len(ids)), threads=threads, f32_kv=True)
    ) as runtime:
        theirs = runtime.all_logits(ids)
        agrees = runtime.tokenize(text) == ids
    return LogitCheck(
        n_tokens=len(ids),
        max_abs_diff=float(np.abs(ours - theirs).max()),
        logit_scale=float(np.abs(ours).max()),
        argmax_agreement=float((ours.argmax(-1) == theirs.argmax(-1)).mean()),
        tokenizer_agrees=agrees,
    )


def generated_image(colour: str, size: int) -> Image.Image:
    """A generated image: a coloured square on white (as the model smoke run uses)."""
    from model.image import square_image

    return square_image(colour, size)


@dataclass(frozen=True)
class EmbeddingCheck:
    """PyTorch vs llama.cpp projector outputs for one generated image."""

    n_tokens: int
    """Visual tokens per image."""
    max_abs_diff: float
    """Largest difference to our model (CLS first, as CLIP): the true PyTorch-vs-llama.cpp gap."""
    mean_abs_diff: float
    """Mean difference to our model over all visual tokens and channels."""
    max_abs_diff_cls_last: float
    """Largest difference to our model run in llama.cpp's CLS-last token order (``cls_last_features``)."""
    scale: float
    """Largest absolute value of our projector output."""


def cls_last_features(tower: Any, pixels: Any) -> Any:
    """Our CLIP tower computed the way the llama.cpp bundled with llama-cpp-python 0.3.36 does it.

    Its llava graph appends the class embedding after the patches but adds position embeddings
    0..n and picks rows 1..n as if CLS came first (llama.cpp issue #25814), so every patch gets its
    neighbour's position embedding and the projector sees CLS in the last slot. Used to show that
    our mmproj tensors are right and the remaining difference is that graph.
    """
    import torch

    clip = tower.vision_tower.vision_model
    emb = clip.embeddings
    patches = emb.patch_embedding(pixels.to(emb.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
    cls = emb.class_embedding.expand(pixels.shape[0], 1, -1)
    hidden = clip.pre_layrnorm(torch.cat([patches, cls], dim=1) + emb.position_embedding.weight[None])
    for layer in clip.encoder.layers[: tower.cfg.n_layer + tower.cfg.select_layer + 1]:
        out = layer(hidden, None)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden[:, 1:]


def check_image_embeddings(checkpoint: Path, llm: Path, mmproj: Path, colour: str = "red") -> EmbeddingCheck:
    """llama.cpp's image embeddings for a generated image against ours (and against the CLS-last variant)."""
    import numpy as np
    import torch

    from model.image import preprocess_images
    from tasks.ship.llama_cpp import LlamaCpp, RuntimeOptions

    vlm = _torch_model(checkpoint)
    size = vlm.config.vision_config["image_size"]
    image = generated_image(colour, size)
    pixels = preprocess_images([image], size, "pad")
    with torch.no_grad():
        ours = vlm.encode_images(pixels)[0].numpy()
        emulated = vlm.model.mm_projector(cls_last_features(vlm.model.vision_tower, pixels))[0].numpy()
    with LlamaCpp(llm, RuntimeOptions(n_ctx=512, threads=1), mmproj) as runtime:
        theirs = runtime.image_embeddings(image, vlm.config.hidden_size)
    return EmbeddingCheck(
        n_tokens=int(theirs.shape[0]),
        max_abs_diff=float(np.abs(ours - theirs).max()),
        mean_abs_diff=float(np.abs(ours - theirs).mean()),
        max_abs_diff_cls_last=float(np.abs(emulated - theirs).max()),
        scale=float(np.abs(ours).max()),
    )


@dataclass(frozen=True)
class AgreementCheck:
    """Greedy answers through llama.cpp vs PyTorch."""

    n: int
    """Question/image pairs asked."""
    agreement_rate: float
    """Fraction of pairs with identical greedy answers."""
    max_new_tokens: int
    """Answer length cap."""
    answers: list[dict[str, str]]
    """Per pair: question, colour, both answers."""


def check_multimodal_agreement(
    checkpoint: Path,
    llm: Path,
    mmproj: Path,
    questions: Sequence[str] = HELD_OUT_QUESTIONS,
    colours: Sequence[str] = ("red", "green", "blue", "yellow"),
    max_new_tokens: int = 8,
    template: str = "v1",
) -> AgreementCheck:
    """Ask each question about each generated image through both runtimes; count identical answers."""
    from tasks.ship.llama_cpp import LlamaCpp, RuntimeOptions

    vlm = _torch_model(checkpoint)
    tokenizer = _tokenizer(checkpoint)
    size = vlm.config.vision_config["image_size"]
    answers = []
    with LlamaCpp(llm, RuntimeOptions(n_ctx=1024, threads=1, f32_kv=True), mmproj) as runtime:
        for colour in colours:
            image = generated_image(colour, size)
            for question in questions:
                ours = _torch_answer(vlm, tokenizer, question, image, template, max_new_tokens)
                theirs = _llamacpp_answer(runtime, tokenizer, question, image, template, max_new_tokens)
                answers.append({"question": question, "colour": colour, "pytorch": ours, "llama_cpp": theirs})
    same = sum(a["pytorch"] == a["llama_cpp"] for a in answers)
    return AgreementCheck(len(answers), same / max(1, len(answers)), max_new_tokens, answers)


def _tokenizer(checkpoint: Path) -> Any:
    from model.tokenizer import load_tokenizer

    return load_tokenizer(checkpoint)


def _prompt_segments(tokenizer: Any, question: str, template: str) -> tuple[list[int], list[int]]:
    """Token ids before and after ``<image>`` in the inference prompt (our tokenisation)."""
    from model.conversation import IMAGE_TOKEN_INDEX, build_prompt, tokenize_prompt

    ids = tokenize_prompt(build_prompt(question, template, with_image=True), tokenizer)
    at = ids.index(IMAGE_TOKEN_INDEX)
    return ids[:at], ids[at + 1 :]


def _torch_answer(vlm: Any, tokenizer: Any, question: str, image: Image.Image, template: str, n: int) -> str:
    import torch

    from model.conversation import IMAGE_TOKEN_INDEX
    from model.image import preprocess_images

    before, after = _prompt_segments(tokenizer, question, template)
    ids = torch.tensor([[*before, IMAGE_TOKEN_INDEX, *after]])
    pixels = preprocess_images([image], vlm.config.vision_config["image_size"], vlm.config.image_aspect_ratio)
    out = vlm.generate(input_ids=ids, images=pixels, max_new_tokens=n, do_sample=False)
    return tokenizer.decode(out[0], skip_special_tokens=True).strip()


def _llamacpp_answer(
    runtime: Any, tokenizer: Any, question: str, image: Image.Image, template: str, n: int
) -> str:
    before, after = _prompt_segments(tokenizer, question, template)
    runtime.reset()
    runtime.eval_segments([before, image, after])
    return tokenizer.decode(runtime.greedy(n), skip_special_tokens=True).strip()
