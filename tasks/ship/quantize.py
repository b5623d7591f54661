"""Quantize a language-model GGUF through llama.cpp (``llama_model_quantize``) and check it.

The quant folder (default ``<export>/quant/<type>/``) holds ``model-<type>.gguf``, a copy of the
export's mmproj (llama.cpp's MobileVLM path keeps the vision side in f16) and ``manifest.json``
written last. Checks: the tensor types llama.cpp chose (k-quants need rows divisible by 256;
llama.cpp falls back to another type for narrower tensors, as the tiny test models have, and the
manifest says how many) and the perplexity of the quantized model on held-out text against the
GGUF it was made from (f16 from a default export).
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from model.gguf_export import gguf_summary
from tasks.core.identity import atomic_path, code_version, hash_json, read_json, sha256_file
from tasks.ship.export import MANIFEST, verified_manifest, write_manifest

log = logging.getLogger(__name__)

PAPER_QUANT = "q4_k_s"
"""The paper's 4-bit type (its 8-bit type is q8_0)."""
K_QUANT_ROW = 256
"""Row width that k-quants (q*_k*) need; narrower tensors get a fallback type."""
DEFAULT_EVAL_TEXT = (
    "A small dog runs on the grass near a river. Two people walk under a tree in the snow. "
    "An old car is parked on a busy street, and a white cat sleeps in a kitchen. "
    "A green bird sits on the grass. What is in the picture? It is a red fox in the snow."
)
"""Held-out text for the perplexity check when none is given (use a real corpus for real models)."""


class QuantizeError(ValueError):
    """A quantization request that cannot be carried out."""


@dataclass
class QuantResult:
    """Where a quantization lives and what its checks found."""

    quant_id: str
    """Identity: hash of the source (export id or file sha256), the type and the quantizer version."""
    quant_type: str
    """llama.cpp type name, e.g. ``q4_k_s``."""
    out_dir: Path
    """The quant folder."""
    llm: Path
    """Quantized language-model GGUF."""
    mmproj: Path | None
    """The mmproj copied from the export (None for a language-model-only export)."""
    reused: bool
    """True when a verified quantization with this identity already existed."""
    manifest: dict[str, Any] = field(default_factory=dict)
    """The manifest (identity, inputs, files with sha256, checks)."""


def ftype_of(quant_type: str) -> int:
    """llama.cpp's ``LLAMA_FTYPE_*`` for a type name such as ``q4_k_s`` or ``q8_0``."""
    import llama_cpp

    name = quant_type.strip().upper()
    value = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}", None)
    if value is None and name == "F32":
        value = llama_cpp.LLAMA_FTYPE_ALL_F32
    if value is None:
        known = sorted(
            k.removeprefix("LLAMA_FTYPE_MOSTLY_").lower()
            for k in dir(llama_cpp)
            if k.startswith("LLAMA_FTYPE_MOSTLY_")
        )
        raise QuantizeError(f"unknown quant type {quant_type!r}; llama.cpp knows: {', '.join(known)}")
    return int(value)


def source_identity(gguf_path: Path) -> dict[str, str]:
    """What a quantization is made from: the export id for a GGUF in an export folder, else its sha256."""
    manifest_path = gguf_path.parent / MANIFEST
    if manifest_path.is_file():
        manifest = read_json(manifest_path)
        if manifest.get("kind") == "export" and manifest.get("llm") == gguf_path.name:
            return {"export_id": manifest["id"], "file": gguf_path.name}
    return {"sha256": sha256_file(gguf_path), "file": gguf_path.name}


def quant_identity(source: dict[str, str], quant_type: str) -> str:
    """Identity of a quantization."""
    return hash_json({"source": source, "type": quant_type.lower(), "code": code_version("quantizer")})


def _validate_source(gguf_path: Path) -> None:
    if not gguf_path.is_file():
        raise QuantizeError(f"{gguf_path} does not exist; pass the model-*.gguf written by `mvlm export`")
    with open(gguf_path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise QuantizeError(
                f"{gguf_path} is not a GGUF file (no GGUF magic); pass a `mvlm export` output"
            )


def quantize(
    gguf_path: str | Path,
    quant_type: str = PAPER_QUANT,
    out_dir: str | Path | None = None,
    eval_text: str | None = None,
    threads: int = 2,
) -> QuantResult:
    """Quantize ``gguf_path`` to ``quant_type`` (skipped when a verified result exists), then check it."""
    gguf_path, quant_type = Path(gguf_path), quant_type.lower()
    _validate_source(gguf_path)
    ftype = ftype_of(quant_type)
    source = source_identity(gguf_path)
    quant_id = quant_identity(source, quant_type)
    out = Path(out_dir) if out_dir else gguf_path.parent / "quant" / quant_type
    manifest = verified_manifest(out, quant_id)
    reused = manifest is not None
    if manifest is None:
        with atomic_path(out) as tmp:
            tmp.mkdir()
            manifest = _build(gguf_path, tmp, quant_type, ftype, quant_id, source, eval_text, threads)
        log.info("quantized %s to %s: %s", gguf_path.name, quant_type, out)
    else:
        log.info("quant %s already in %s and verified; reusing", quant_id, out)
    mmproj = manifest.get("mmproj")
    return QuantResult(
        quant_id, quant_type, out, out / manifest["llm"], out / mmproj if mmproj else None, reused, manifest
    )


def _build(
    source_path: Path,
    folder: Path,
    quant_type: str,
    ftype: int,
    quant_id: str,
    source: dict[str, str],
    eval_text: str | None,
    threads: int,
) -> dict[str, Any]:
    llm = folder / f"model-{quant_type}.gguf"
    run_llama_quantize(source_path, llm, ftype, threads)
    mmproj = _copy_mmproj(source_path.parent, folder)
    checks = {
        "tensor_types": tensor_type_check(llm, quant_type),
        "perplexity": asdict(perplexity_check(llm, source_path, eval_text or DEFAULT_EVAL_TEXT, threads)),
    }
    log.debug("quant %s checks: %s", quant_type, checks)
    return write_manifest(
        folder,
        "quant",
        quant_id,
        {"source": source, "source_path": str(source_path.resolve())},
        quant_type=quant_type,
        llm=llm.name,
        mmproj=mmproj,
        size_bytes=llm.stat().st_size,
        model=gguf_summary(llm)["name"],
        llama_cpp=_llama_cpp_build(),
        checks=checks,
    )


def _llama_cpp_build() -> str:
    from tasks.ship.llama_cpp import llama_cpp_build

    return llama_cpp_build()


def run_llama_quantize(source: Path, dest: Path, ftype: int, threads: int) -> None:
    """llama-cpp-python's ``llama_model_quantize`` from ``llama_model_quantize_default_params()``."""
    import llama_cpp

    from tasks.ship.llama_cpp import _route_native_logs

    _route_native_logs()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(dest).encode(), params)
    if code != 0 or not dest.is_file():
        raise QuantizeError(f"llama_model_quantize({source.name}, ftype={ftype}) failed with code {code}")


def _copy_mmproj(export_dir: Path, folder: Path) -> str | None:
    manifest_path = export_dir / MANIFEST
    name = read_json(manifest_path).get("mmproj") if manifest_path.is_file() else None
    if not name:
        return None
    shutil.copy2(export_dir / name, folder / name)
    return name


def tensor_type_check(path: Path, quant_type: str) -> dict[str, Any]:
    """Tensor-type histogram; for k-quants, how many matrices were too narrow and fell back."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    histogram: dict[str, int] = {}
    narrow = 0
    for tensor in reader.tensors:
        histogram[tensor.tensor_type.name] = histogram.get(tensor.tensor_type.name, 0) + 1
        if len(tensor.shape) == 2 and int(tensor.shape[0]) % K_QUANT_ROW:
            narrow += 1
    is_k = "_k" in quant_type
    note = (
        f"{narrow} matrices have rows not divisible by {K_QUANT_ROW}; "
        "llama.cpp stored them with a fallback type"
        if is_k and narrow
        else "all matrices have the requested block size"
    )
    return {
        "histogram": dict(sorted(histogram.items())),
        "k_quant_fallbacks": narrow if is_k else 0,
        "note": note,
    }


@dataclass(frozen=True)
class PerplexityCheck:
    """Perplexity of the quantized model and of its source on the same held-out tokens."""

    tokens: int
    """Tokens scored."""
    perplexity: float
    """Quantized model."""
    reference_perplexity: float
    """The GGUF it was quantized from."""
    reference: str
    """File name of the reference."""
    ratio: float
    """Quantized over reference perplexity (1.0: no loss)."""


def perplexity_check(quantized: Path, reference: Path, text: str, threads: int = 2) -> PerplexityCheck:
    """Perplexity of both models on ``text`` (llama.cpp's tokenisation, windows of 256 tokens)."""
    from tasks.ship.llama_cpp import LlamaCpp, RuntimeOptions

    options = RuntimeOptions(n_ctx=256, n_batch=256, threads=threads)
    with LlamaCpp(reference, options) as runtime:
        tokens = runtime.tokenize(text)
        ref = perplexity(runtime, tokens)
    with LlamaCpp(quantized, options) as runtime:
        ppl = perplexity(runtime, tokens)
    return PerplexityCheck(len(tokens), ppl, ref, reference.name, ppl / ref)


def perplexity(runtime: Any, tokens: list[int], window: int = 256) -> float:
    """exp(mean negative log-likelihood) of each token given the ones before it in its window."""
    if len(tokens) < 2:
        raise QuantizeError("the held-out text must tokenise to at least two tokens")
    nll, count = 0.0, 0
    for start in range(0, len(tokens) - 1, window - 1):
        chunk = tokens[start : start + window]
        if len(chunk) < 2:
            break
        logits = runtime.all_logits(chunk)[:-1].astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        nll -= float(log_probs[np.arange(len(chunk) - 1), chunk[1:]].sum())
        count += len(chunk) - 1
    return math.exp(nll / count)
