"""GGUF export: llama.cpp (through llama-cpp-python) computes what our PyTorch model computes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import pytest

from model.gguf_export import GGUFExportError, permute_qk
from tasks.ship.export import ExportConfig, ExportError, export_checkpoint, run_checks
from tasks.ship.export_checks import check_image_embeddings, check_logits, check_multimodal_agreement

pytest_plugins = ("export_fixtures",)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _field(reader: gguf.GGUFReader, key: str):
    value = reader.fields[key]
    return value.contents() if hasattr(value, "contents") else value.parts[value.data[0]]


def test_f32_gguf_logits_equal_pytorch(trained_vlm: Path, f32_export) -> None:
    check = check_logits(trained_vlm, f32_export.llm)
    print(f"logits: max |diff| {check.max_abs_diff:.2e} at logit scale {check.logit_scale:.2f}")
    assert check.tokenizer_agrees, "llama.cpp must tokenise the prompt to our ids"
    assert check.max_abs_diff < 1e-4 * max(1.0, check.logit_scale)
    assert check.argmax_agreement == 1.0


def test_f16_gguf_logits_close(trained_vlm: Path, f16_export) -> None:
    check = check_logits(trained_vlm, f16_export.llm)
    assert check.max_abs_diff < 0.05 * max(1.0, check.logit_scale)
    assert check.argmax_agreement >= 0.9


def test_permute_qk_matches_rotate_half_pairs() -> None:
    import torch

    # one head of 4 dims: HF rows [x0, x1 | y0, y1] (rotate-half pairs (0,2), (1,3)) become interleaved.
    weight = torch.arange(8.0).reshape(4, 2)
    out = permute_qk(weight, n_head=1)
    assert out[:, 0].tolist() == [0.0, 4.0, 2.0, 6.0]


def test_llm_gguf_header_and_tokenizer(f32_export, trained_vlm: Path) -> None:
    reader = gguf.GGUFReader(str(f32_export.llm))
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "tokenizer.ggml.model") == "llama"
    tokens = json.loads((trained_vlm / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == len(tokens)
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output.weight", "blk.1.attn_q.weight", "blk.1.ffn_down.weight"} <= names


def test_mmproj_keys_and_tensor_names(f32_export) -> None:
    reader = gguf.GGUFReader(str(f32_export.mmproj))
    assert _field(reader, "clip.projector_type") == "ldp"
    assert _field(reader, "clip.has_vision_encoder") is True
    assert _field(reader, "clip.vision.block_count") == 1  # tiny-vit has 2 layers; the last is dropped
    assert list(_field(reader, "clip.vision.feature_layer")) == [1]
    names = {t.name for t in reader.tensors}
    assert "v.blk.0.ffn_up.weight" in names and not any(n.startswith("v.blk.1.") for n in names)
    assert not any("post_ln" in n for n in names)
    assert "mm.model.mb_block.1.block.1.fc1.weight" in names and "mm.model.mlp.3.weight" in names
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["v.patch_embd.weight"] == "F16" and types["mm.model.mb_block.2.block.0.0.weight"] == "F16"


def test_mmproj_embeddings_match_llamacpp_graph(trained_vlm: Path, f32_export) -> None:
    """Our mmproj tensors reproduce our tower run in llama.cpp's CLS-last order (the emulation); the
    true gap to PyTorch is bounded on both sides: above, so that a regression shows; below, so that an
    upstream fix of the token order (llama.cpp #25814) fails here and gets the bounds tightened."""
    check = check_image_embeddings(trained_vlm, f32_export.llm, f32_export.mmproj)
    print(
        f"mmproj: {check.n_tokens} tokens; vs PyTorch max |diff| {check.max_abs_diff:.3f}, mean "
        f"{check.mean_abs_diff:.4f}; vs ours with llama.cpp's CLS-last order "
        f"{check.max_abs_diff_cls_last:.4f} (scale {check.scale:.2f})"
    )
    assert check.n_tokens == 144
    assert check.max_abs_diff_cls_last < 0.01 * check.scale
    # measured with llama-cpp-python 0.3.36: max 1.23 x scale, mean 0.022 x scale
    assert check.max_abs_diff < 2.0 * check.scale and check.mean_abs_diff < 0.08 * check.scale, check
    assert check.max_abs_diff > 0.1 * check.scale, (
        f"llama.cpp now matches PyTorch ({check}): the CLS-order defect looks fixed upstream; tighten "
        "these bounds to the new gap and retire tasks.ship.export.cls_last_features"
    )


def test_llamacpp_multimodal_agrees_with_pytorch(trained_vlm: Path, f32_export) -> None:
    check = check_multimodal_agreement(trained_vlm, f32_export.llm, f32_export.mmproj)
    print(f"llama.cpp vs PyTorch greedy answers: {check.agreement_rate:.0%} of {check.n}")
    assert check.n == 16
    assert check.agreement_rate >= 0.75  # 16 of 16 measured; the CLS-order defect may cost a few
    run = run_checks(trained_vlm, f32_export)  # and the export records both gaps for MLflow
    assert run["image_embeddings"]["max_abs_diff"] > run["image_embeddings"]["max_abs_diff_cls_last"]
    assert run["multimodal_agreement"]["agreement_rate"] == check.agreement_rate


def test_ldpv2_mmproj_runs_in_llamacpp(tmp_path: Path, tiny_tokenizer) -> None:
    import model

    vlm = model.build("mobilevlm-v2-tiny-336", vocab_size=len(tiny_tokenizer))
    model.save(vlm, tmp_path / "ckpt", tokenizer=tiny_tokenizer)
    result = export_checkpoint(tmp_path / "ckpt", tmp_path / "out", ExportConfig("f32", "f32"))
    reader = gguf.GGUFReader(str(result.mmproj))
    assert _field(reader, "clip.projector_type") == "ldpv2"
    assert "mm.model.peg.0.weight" in {t.name for t in reader.tensors}
    check = check_image_embeddings(tmp_path / "ckpt", result.llm, result.mmproj)
    assert check.n_tokens == 144 and check.max_abs_diff_cls_last < 0.01 * check.scale


def test_export_is_reused_rebuilt_and_identified(tmp_path: Path, trained_vlm: Path) -> None:
    out = tmp_path / "export"
    first = export_checkpoint(trained_vlm, out)
    assert not first.reused and first.mmproj is not None
    assert export_checkpoint(trained_vlm, out).reused
    first.llm.write_bytes(b"GGUF broken")
    rebuilt = export_checkpoint(trained_vlm, out)
    assert not rebuilt.reused and rebuilt.export_id == first.export_id
    other = export_checkpoint(trained_vlm, tmp_path / "f32", ExportConfig("f32", "f16"))
    assert other.export_id != first.export_id


def test_language_model_checkpoint_exports_without_mmproj(tmp_path: Path, tiny_tokenizer) -> None:
    import model

    model.save(
        model.build("tiny-llama", vocab_size=len(tiny_tokenizer)), tmp_path / "lm", tokenizer=tiny_tokenizer
    )
    result = export_checkpoint(tmp_path / "lm", tmp_path / "out", ExportConfig("f32", "f32"))
    assert result.mmproj is None and sorted(p.name for p in result.out_dir.iterdir()) == [
        "manifest.json",
        "model-f32.gguf",
    ]
    assert check_logits(tmp_path / "lm", result.llm).max_abs_diff < 1e-4


def test_export_errors_name_the_problem(tmp_path: Path, trained_vlm: Path, tiny_tokenizer) -> None:
    import model

    bare = tmp_path / "bare"
    shutil.copytree(trained_vlm, bare)
    (bare / "tokenizer.json").unlink()
    with pytest.raises(ExportError, match=r"tokenizer\.json"):
        export_checkpoint(bare, tmp_path / "x")
    with pytest.raises(ExportError, match=r"config\.json"):
        export_checkpoint(tmp_path, tmp_path / "y")
    model.save(
        model.build("mobilevlm-tiny", vocab_size=len(tiny_tokenizer)),
        tmp_path / "56px",
        tokenizer=tiny_tokenizer,
    )
    with pytest.raises(GGUFExportError, match=r"24x24 patch grid.*tiny-vit-336"):
        export_checkpoint(tmp_path / "56px", tmp_path / "z")
