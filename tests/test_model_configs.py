"""Every config row builds on the meta device and reproduces the published counts."""

from __future__ import annotations

import pytest
import torch

import model
from model.config import LLM_CONFIGS, VLM_CONFIGS, config_names, get_config

ALL = list(config_names())


@pytest.mark.parametrize("name", ALL)
def test_every_row_builds_on_meta(name: str) -> None:
    module = model.build(name, device="meta")
    params = list(module.parameters())
    assert params and all(p.device.type == "meta" for p in params)
    assert model.info(name)["params"]["total"] == sum(p.numel() for p in params)


@pytest.mark.parametrize(
    ("name", "llm", "vision", "projector"),
    [
        ("mobilellama-1.4b", 1_364_297_728, 0, 0),
        ("mobilellama-2.7b", 2_701_560_320, 0, 0),
        ("clip-vit-l-14-336", 0, 303_507_456, 0),
        ("mobilevlm-1.7b", 1_364_297_728, 303_507_456, 18_936_832),
        ("mobilevlm-3b", 2_701_560_320, 303_507_456, 28_913_920),
        ("mobilevlm-v2-1.7b", 1_364_297_728, 303_507_456, 6_316_032),
        # LDPv2 at width 2560: 1024x2560+2560 + 2560x2560+2560 (MLP) + 2560x9+2560 (PEG depthwise conv)
        ("mobilevlm-v2-3b", 2_701_560_320, 303_507_456, 9_205_760),
    ],
)
def test_published_parameter_counts(name: str, llm: int, vision: int, projector: int) -> None:
    params = model.info(name)["params"]
    assert (params["llm"], params["vision"], params["projector"]) == (llm, vision, projector)
    assert params["total"] == llm + vision + projector


def test_mobilellama_shapes_match_the_paper() -> None:
    small, large = LLM_CONFIGS["mobilellama-1.4b"], LLM_CONFIGS["mobilellama-2.7b"]
    assert (small.n_layer, small.hidden, small.n_head, small.intermediate) == (24, 2048, 16, 5632)
    assert (large.n_layer, large.hidden, large.n_head, large.intermediate) == (32, 2560, 32, 6912)
    m = model.build("mobilellama-1.4b", device="meta")
    assert not m.config.tie_word_embeddings
    assert m.lm_head.weight is not m.model.embed_tokens.weight


@pytest.mark.parametrize(
    ("name", "tokens"), [("mobilevlm-1.7b", 144), ("mobilevlm-3b", 144), ("mobilevlm-tiny", 4)]
)
def test_visual_tokens(name: str, tokens: int) -> None:
    assert VLM_CONFIGS[name].visual_tokens == tokens
    assert model.info(name)["visual_tokens"] == tokens


def test_ldp_turns_576_tokens_into_144_on_real_shapes() -> None:
    vlm = model.build("mobilevlm-1.7b", device="meta")
    features = torch.empty(1, 576, 1024, device="meta")
    assert vlm.model.mm_projector(features).shape == (1, 144, 2048)


def test_unknown_name_lists_known_configs() -> None:
    with pytest.raises(KeyError) as err:
        model.build("mobilevlm-7b")
    message = str(err.value)
    assert "mobilevlm-7b" in message
    assert all(name in message for name in ALL)


def test_overrides_apply_to_the_right_row() -> None:
    row = get_config("mobilevlm-tiny", vocab_size=300, projector="ldpnetv2", vision_select_layer=-1)
    assert (row.llm.vocab_size, row.projector, row.vision.select_layer) == (300, "ldpnetv2", -1)
    m = model.build("mobilevlm-tiny", vocab_size=300)
    assert m.lm_head.weight.shape == (300, 64)
    with pytest.raises(TypeError, match="unknown override"):
        get_config("tiny-llama", n_layers=3)


def test_ldp_refuses_cls_token_grid() -> None:
    with pytest.raises(ValueError, match="square patch grid"):
        get_config("mobilevlm-tiny", vision_select_feature="cls_patch")
