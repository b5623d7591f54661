"""llama.cpp quantization of the exported language model: types, fallbacks, perplexity, reuse."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest

from tasks.ship.quantize import QuantizeError, ftype_of, quantize

pytest_plugins = ("export_fixtures",)
pytestmark = pytest.mark.usefixtures("one_torch_thread")

HELD_OUT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "USER: What colour is the square? ASSISTANT: It is red.</s> "
    "USER: Which shape do you see? ASSISTANT: It is blue.</s>"
)


@pytest.mark.parametrize(("quant_type", "max_ratio"), [("q8_0", 1.02), ("q4_0", 1.3), ("q4_k_s", 1.3)])
def test_quantize_types_and_perplexity(tmp_path: Path, f16_export, quant_type: str, max_ratio: float) -> None:
    result = quantize(f16_export.llm, quant_type, tmp_path / quant_type, eval_text=HELD_OUT)
    checks = result.manifest["checks"]
    ppl = checks["perplexity"]
    print(f"{quant_type}: ppl {ppl['perplexity']:.3f} vs f16 {ppl['reference_perplexity']:.3f}; {checks}")
    assert ppl["reference"] == "model-f16.gguf" and ppl["tokens"] > 20
    assert ppl["ratio"] < max_ratio
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(result.llm)).tensors}
    if quant_type == "q4_k_s":  # tiny widths (64, 176) are not multiples of 256: all matrices fall back
        assert checks["tensor_types"]["k_quant_fallbacks"] > 0 and "Q4_K" not in types
    else:
        assert quant_type.upper() in types
    assert result.mmproj is not None and result.mmproj.name == "mmproj-f16.gguf"
    assert result.llm.stat().st_size < f16_export.llm.stat().st_size


def test_quantize_is_reused_and_identity_follows_export(tmp_path: Path, f16_export, f32_export) -> None:
    first = quantize(f16_export.llm, "q8_0", tmp_path / "a")
    again = quantize(f16_export.llm, "q8_0", tmp_path / "a")
    assert again.reused and again.quant_id == first.quant_id
    assert first.manifest["inputs"]["source"]["export_id"] == f16_export.export_id
    assert quantize(f32_export.llm, "q8_0", tmp_path / "b").quant_id != first.quant_id


def test_quantize_errors(tmp_path: Path, f16_export) -> None:
    with pytest.raises(QuantizeError, match="unknown quant type 'q3_x'"):
        quantize(f16_export.llm, "q3_x", tmp_path / "x")
    with pytest.raises(QuantizeError, match="does not exist"):
        quantize(tmp_path / "missing.gguf", "q8_0")
    (tmp_path / "fake.gguf").write_text("not a gguf")
    with pytest.raises(QuantizeError, match="not a GGUF"):
        quantize(tmp_path / "fake.gguf", "q8_0")
    assert ftype_of("Q4_K_S") == 14 and ftype_of("q8_0") == 7


def test_q4_k_s_quantizes_real_k_quant_blocks(tmp_path: Path, tiny_tokenizer) -> None:
    """The paper's type on a row whose widths are multiples of 256 (``mobilevlm-tiny-256-336``): the
    matrices become Q4_K (no fallback), and perplexity stays close to f16."""
    from export_fixtures import train_tiny_vlm

    from tasks.ship.export import export_checkpoint

    checkpoint = train_tiny_vlm(tiny_tokenizer, tmp_path / "ckpt", name="mobilevlm-tiny-256-336", lr=5e-4)
    export = export_checkpoint(checkpoint, tmp_path / "export")
    result = quantize(export.llm, "q4_k_s", tmp_path / "q4_k_s", eval_text=HELD_OUT)
    checks = result.manifest["checks"]
    types = [t.tensor_type.name for t in gguf.GGUFReader(str(result.llm)).tensors]
    print(f"q4_k_s at width 256: {checks}; tensor types {sorted(set(types))}")
    assert checks["tensor_types"]["k_quant_fallbacks"] == 0
    assert types.count("Q4_K") >= 2 * 6  # q, k, v, o, gate, up of both blocks at least (down may be Q5_K)
    ppl = checks["perplexity"]
    assert ppl["reference_perplexity"] < 1000  # the model learned (vocab 512): the delta means something
    assert abs(ppl["ratio"] - 1) < 0.1, ppl
