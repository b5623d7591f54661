"""GGUF export for llama.cpp: the language model as a LLaMA GGUF and the vision side as an mmproj GGUF.

Only torch, numpy and the ``gguf`` package are used. Names and keys follow the llama.cpp that
llama-cpp-python 0.3.36 vendors (commit 0c1e570):

* language model: ``general.architecture = "llama"``, tensors ``token_embd``, ``blk.N.attn_q`` ...
  ``output``; Q and K weights are permuted from the Hugging Face rotate-half layout to the
  interleaved layout llama.cpp's rotary embedding expects (``LlamaModel.permute`` in
  ``convert_hf_to_gguf``); the tokenizer is written as a SentencePiece-style ``llama`` vocabulary
  (tokens, scores, token types) so llama.cpp tokenises with the same pieces.
* mmproj: ``general.architecture = "clip"``, keys from ``tools/mtmd/clip-impl.h``
  (``clip.projector_type`` = ``ldp`` / ``ldpv2`` / ``mlp``, ``clip.has_vision_encoder``,
  ``clip.vision.*``), CLIP tensors ``v.*``, projector tensors ``mm.model.*`` (LDP) as
  ``clip.cpp`` loads them. Encoder layers after the selected feature layer are dropped (for
  ``select_layer = -2`` the last CLIP layer) and ``clip.vision.feature_layer`` names the hidden
  state llama.cpp must return, so its output equals our tower's.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import gguf
import numpy as np
import torch

from model.config import VisionConfig
from model.gguf_vocab import GGUFExportError, Vocab, add_vocab
from model.mobilevlm import vision_row

log = logging.getLogger(__name__)

GGUFDtype = Literal["f32", "f16"]
GGUF_DTYPES: tuple[str, ...] = ("f32", "f16")
FILE_TYPE = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}

# llama.cpp's projector type names (tools/mtmd/clip-impl.h PROJECTOR_TYPE_NAMES) for our projector kinds.
PROJECTOR_GGUF_TYPES: dict[str, str] = {"ldpnet": "ldp", "ldpnetv2": "ldpv2", "mlp2x_gelu": "mlp"}
# llama.cpp's LDP / LDPv2 graphs (tools/mtmd/models/llava.cpp) hard-code a 24x24 patch grid.
LLAMACPP_LDP_GRID = 24

_LLM_LAYER_NAMES: dict[str, str] = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_LLM_GLOBAL_NAMES: dict[str, str] = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_CLIP_LAYER_NAMES: dict[str, str] = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.out_proj": "attn_out",
    "layer_norm1": "ln1",
    "layer_norm2": "ln2",
    "mlp.fc1": "ffn_up",
    "mlp.fc2": "ffn_down",
}
_CLIP_GLOBAL_NAMES: dict[str, str] = {
    "embeddings.class_embedding": "v.class_embd",
    "embeddings.patch_embedding.weight": "v.patch_embd.weight",
    "embeddings.position_embedding.weight": "v.position_embd.weight",
    "pre_layrnorm.weight": "v.pre_ln.weight",
    "pre_layrnorm.bias": "v.pre_ln.bias",
}
VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
PROJECTOR_PREFIX = "model.mm_projector."


@dataclass(frozen=True)
class GGUFFile:
    """What was written to one GGUF file."""

    path: Path
    """The file."""
    arch: str
    """``general.architecture`` (``llama`` or ``clip``)."""
    n_tensors: int
    """Number of tensors."""
    dtype: str
    """Storage type of the weight matrices (``f32`` or ``f16``)."""

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {**dataclasses.asdict(self), "path": str(self.path)}


# --- language model ---------------------------------------------------------------------------


def permute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half Q/K rows -> the interleaved (Meta) order llama.cpp's RoPE uses, per head."""
    rows = weight.shape[0]
    if rows % (2 * n_head):
        raise GGUFExportError(f"Q/K weight with {rows} rows cannot be split into {n_head} heads of even size")
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def llm_tensor_name(key: str) -> str | None:
    """GGUF name of a language-model state_dict key, or None for keys that are not language-model weights."""
    if key in _LLM_GLOBAL_NAMES:
        return _LLM_GLOBAL_NAMES[key]
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key)
    if match and match.group(2) in _LLM_LAYER_NAMES:
        return f"blk.{match.group(1)}.{_LLM_LAYER_NAMES[match.group(2)]}"
    return None


def _to_numpy(tensor: torch.Tensor, dtype: GGUFDtype, matrix: bool) -> np.ndarray:
    """f16 for weight matrices when ``dtype`` is f16; everything else (norms, biases) f32."""
    array = tensor.detach().to(torch.float32).cpu().numpy()
    return array.astype(np.float16) if dtype == "f16" and matrix else array


def llm_tensors(
    state: dict[str, torch.Tensor], n_head: int, n_head_kv: int, dtype: GGUFDtype
) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, array) for every language-model weight, Q/K permuted."""
    for key, tensor in state.items():
        name = llm_tensor_name(key)
        if name is None:
            continue
        if name.endswith("attn_q.weight"):
            tensor = permute_qk(tensor, n_head)
        elif name.endswith("attn_k.weight"):
            tensor = permute_qk(tensor, n_head_kv)
        yield name, _to_numpy(tensor, dtype, tensor.dim() == 2)


def _check_llm_keys(state: dict[str, torch.Tensor], n_layer: int) -> None:
    expected = set(_LLM_GLOBAL_NAMES) | {
        f"model.layers.{i}.{suffix}" for i in range(n_layer) for suffix in _LLM_LAYER_NAMES
    }
    missing = sorted(expected - set(state))
    if missing:
        raise GGUFExportError(
            f"the state dict lacks {len(missing)} language-model weight(s), e.g. {missing[:4]}; "
            "export needs a LLaMA checkpoint with untied lm_head (MobileLLaMA layout)"
        )


def _hparam(config: Any, name: str) -> Any:
    value = getattr(config, name, None)
    if value is None:
        raise GGUFExportError(f"checkpoint config.json has no {name!r}; it is needed for the GGUF header")
    return value


def rope_theta(config: Any) -> float:
    """RoPE base of a transformers config (``rope_parameters`` in v5, ``rope_theta`` before)."""
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise GGUFExportError("checkpoint config has neither rope_parameters.rope_theta nor rope_theta")
    if params.get("rope_type", "default") != "default":
        raise GGUFExportError(f"rope_type {params['rope_type']!r} is not exported; only 'default' RoPE")
    return float(theta)


def _add_llm_header(writer: gguf.GGUFWriter, config: Any, name: str) -> None:
    n_head = _hparam(config, "num_attention_heads")
    hidden = _hparam(config, "hidden_size")
    writer.add_name(name)
    writer.add_context_length(_hparam(config, "max_position_embeddings"))
    writer.add_embedding_length(hidden)
    writer.add_block_count(_hparam(config, "num_hidden_layers"))
    writer.add_feed_forward_length(_hparam(config, "intermediate_size"))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or n_head)
    writer.add_rope_dimension_count(hidden // n_head)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(float(_hparam(config, "rms_norm_eps")))
    writer.add_vocab_size(_hparam(config, "vocab_size"))


# --- writing ----------------------------------------------------------------------------------


def _write(writer: gguf.GGUFWriter, tensors: Iterator[tuple[str, np.ndarray]]) -> int:
    count = 0
    for name, array in tensors:
        writer.add_tensor(name, np.ascontiguousarray(array))
        count += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return count


def _add_extra(writer: gguf.GGUFWriter, extra: dict[str, str] | None) -> None:
    for key, value in (extra or {}).items():
        writer.add_string(key, value)


def write_llm_gguf(
    state: dict[str, torch.Tensor],
    config: Any,
    vocab: Vocab,
    path: str | Path,
    dtype: GGUFDtype = "f16",
    extra: dict[str, str] | None = None,
) -> GGUFFile:
    """Write the language model (with its vocabulary) as a LLaMA GGUF at ``path``."""
    if dtype not in GGUF_DTYPES:
        raise GGUFExportError(f"dtype must be one of {GGUF_DTYPES}, got {dtype!r}")
    n_head = _hparam(config, "num_attention_heads")
    n_head_kv = getattr(config, "num_key_value_heads", None) or n_head
    _check_llm_keys(state, _hparam(config, "num_hidden_layers"))
    if len(vocab.tokens) != _hparam(config, "vocab_size"):
        raise GGUFExportError(
            f"the vocabulary has {len(vocab.tokens)} tokens but the model's vocab_size is "
            f"{_hparam(config, 'vocab_size')}"
        )
    writer = gguf.GGUFWriter(str(path), "llama")
    _add_llm_header(writer, config, getattr(config, "mvlm_name", None) or "mobilellama")
    writer.add_file_type(FILE_TYPE[dtype])
    add_vocab(writer, vocab)
    _add_extra(writer, extra)
    count = _write(writer, llm_tensors(state, n_head, n_head_kv, dtype))
    log.debug("wrote %s: llama GGUF, %d tensors, %s", path, count, dtype)
    return GGUFFile(Path(path), "llama", count, dtype)


# --- mmproj (vision tower + projector) ---------------------------------------------------------


def vision_hparams(config: Any) -> VisionConfig:
    """The vision row of a multimodal checkpoint config (its ``vision_config``, or the table row named
    by ``mm_vision_tower`` for the authors' checkpoints)."""
    try:
        return vision_row(config)
    except ValueError as err:
        raise GGUFExportError(f"cannot export the mmproj: {err}") from err


def check_mmproj_supported(hp: VisionConfig, projector: str) -> None:
    """Raise GGUFExportError when llama.cpp's mmproj graph cannot compute this model."""
    if projector not in PROJECTOR_GGUF_TYPES:
        raise GGUFExportError(
            f"mm_projector_type {projector!r} has no llama.cpp equivalent; "
            f"known: {sorted(PROJECTOR_GGUF_TYPES)}"
        )
    if hp.select_feature != "patch":
        raise GGUFExportError(
            "llama.cpp's llava graph always drops CLS: mm_vision_select_feature must be 'patch'"
        )
    if projector != "mlp2x_gelu" and hp.grid != LLAMACPP_LDP_GRID:
        raise GGUFExportError(
            f"llama.cpp's {PROJECTOR_GGUF_TYPES[projector]} graph assumes a {LLAMACPP_LDP_GRID}x"
            f"{LLAMACPP_LDP_GRID} patch grid; this model has {hp.grid}x{hp.grid} "
            f"(image_size {hp.image_size} / patch_size {hp.patch_size}); use a 336 px / 14 px tower "
            "such as the 'tiny-vit-336' row"
        )
    if not 0 < hp.feature_layer <= hp.n_layer:
        raise GGUFExportError(
            f"mm_vision_select_layer {hp.select_layer} is outside the {hp.n_layer}-layer tower"
        )
    if hp.hidden_act not in ("quick_gelu", "gelu"):
        raise GGUFExportError(f"vision hidden_act {hp.hidden_act!r} is not supported by llama.cpp's CLIP")


def vision_tensor_name(key: str, keep_layers: int) -> str | None:
    """GGUF name of a CLIP key (relative to ``vision_model.``); None to skip (post-LN, dropped layers)."""
    if key in _CLIP_GLOBAL_NAMES:
        return _CLIP_GLOBAL_NAMES[key]
    match = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
    if not match or int(match.group(1)) >= keep_layers:
        return None
    part = _CLIP_LAYER_NAMES.get(match.group(2))
    return f"v.blk.{match.group(1)}.{part}.{match.group(3)}" if part else None


def projector_tensor_name(key: str) -> str:
    """GGUF name of a projector key (after ``model.mm_projector.``), renamed as llama.cpp's converter does."""
    name = "mm." + key
    name = re.sub(r"^mm\.mlp\.mlp\.", "mm.model.mlp.", name)
    return re.sub(r"^mm\.peg\.peg\.", "mm.model.peg.", name)


def _vision_array(name: str, tensor: torch.Tensor, dtype: GGUFDtype) -> np.ndarray:
    """The patch-embedding conv is stored f16 (as llama.cpp's converter does); matrices follow ``dtype``."""
    if tensor.dim() == 4:
        return tensor.detach().float().cpu().numpy().astype(np.float16)
    return _to_numpy(tensor, dtype, tensor.dim() == 2 and name.endswith(".weight"))


def _projector_array(tensor: torch.Tensor, dtype: GGUFDtype) -> np.ndarray:
    """Squeezed like llama.cpp's converter (1x1 convs become matrices, depthwise kernels 3-D).

    Conv weights (4-D before squeezing) are always f16: ggml's depthwise conv multiplies the kernel
    with an f16 im2col, which the CPU backend supports only for an f16 kernel. Linear weights are
    f16 when ``dtype`` is f16; biases and norms stay f32.
    """
    array = tensor.detach().float().cpu().numpy()
    conv, matrix = array.ndim == 4, array.ndim == 2
    array = array.squeeze()
    return array.astype(np.float16) if conv or (matrix and dtype == "f16") else array


def mmproj_tensors(
    state: dict[str, torch.Tensor], hp: VisionConfig, dtype: GGUFDtype
) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, array) for the kept CLIP layers and the projector."""
    for key, tensor in state.items():
        if key.startswith(VISION_PREFIX):
            name = vision_tensor_name(key.removeprefix(VISION_PREFIX), hp.feature_layer)
            if name is not None:
                yield name, _vision_array(name, tensor, dtype)
        elif key.startswith(PROJECTOR_PREFIX):
            yield projector_tensor_name(key.removeprefix(PROJECTOR_PREFIX)), _projector_array(tensor, dtype)


def _add_clip_header(
    writer: gguf.GGUFWriter, hp: VisionConfig, projector: str, image_mean: tuple, image_std: tuple
) -> None:
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.has_llava_projector", True)
    writer.add_string("clip.projector_type", PROJECTOR_GGUF_TYPES[projector])
    writer.add_description(f"MobileVLM image encoder + {projector} projector (mmproj)")
    writer.add_uint32("clip.vision.image_size", hp.image_size)
    writer.add_uint32("clip.vision.patch_size", hp.patch_size)
    writer.add_uint32("clip.vision.embedding_length", hp.hidden)
    writer.add_uint32("clip.vision.feed_forward_length", hp.intermediate)
    writer.add_uint32("clip.vision.projection_dim", hp.projection_dim)
    writer.add_uint32("clip.vision.attention.head_count", hp.n_head)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", hp.layer_norm_eps)
    writer.add_uint32("clip.vision.block_count", hp.feature_layer)
    writer.add_array("clip.vision.feature_layer", [hp.feature_layer])
    writer.add_array("clip.vision.image_mean", [float(x) for x in image_mean])
    writer.add_array("clip.vision.image_std", [float(x) for x in image_std])
    writer.add_bool("clip.use_gelu", hp.hidden_act == "gelu")


def write_mmproj_gguf(
    state: dict[str, torch.Tensor],
    config: Any,
    path: str | Path,
    image_mean: tuple[float, float, float],
    image_std: tuple[float, float, float],
    dtype: GGUFDtype = "f16",
    extra: dict[str, str] | None = None,
) -> GGUFFile:
    """Write the vision tower (up to the feature layer) and projector as an mmproj GGUF at ``path``."""
    if dtype not in GGUF_DTYPES:
        raise GGUFExportError(f"dtype must be one of {GGUF_DTYPES}, got {dtype!r}")
    hp = vision_hparams(config)
    projector = getattr(config, "mm_projector_type", None) or ""
    check_mmproj_supported(hp, projector)
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_name(f"{getattr(config, 'mvlm_name', None) or 'mobilevlm'}-mmproj")
    writer.add_file_type(FILE_TYPE[dtype])
    _add_clip_header(writer, hp, projector, image_mean, image_std)
    _add_extra(writer, extra)
    count = _write(writer, mmproj_tensors(state, hp, dtype))
    log.debug(
        "wrote %s: mmproj (%s, %d of %d CLIP layers), %d tensors",
        path,
        projector,
        hp.feature_layer,
        hp.n_layer,
        count,
    )
    return GGUFFile(Path(path), "clip", count, dtype)


# --- reading back -----------------------------------------------------------------------------


def gguf_summary(path: str | Path) -> dict[str, Any]:
    """Architecture, name, tensor count and tensor-type histogram of a GGUF file (manifests, reports)."""
    reader = gguf.GGUFReader(str(path))
    types: dict[str, int] = {}
    for tensor in reader.tensors:
        types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
    return {
        "arch": _string_field(reader, "general.architecture"),
        "name": _string_field(reader, "general.name"),
        "n_tensors": len(reader.tensors),
        "tensor_types": dict(sorted(types.items())),
    }


def _string_field(reader: gguf.GGUFReader, key: str) -> str:
    field = reader.fields.get(key)
    return str(field.contents()) if field is not None else "?"
