"""Checkpoint directories: round trip, official key layout, transformers interop, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import model
from model.checkpoint import CheckpointError
from model.mobilevlm import MobileVLMConfig, vision_row

IMG = -200


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    vlm = model.build("mobilevlm-tiny").eval()
    path = tmp_path_factory.mktemp("ck") / "tiny"
    model.save(vlm, path)
    return vlm, path


def _keys(path: Path) -> set[str]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


def test_round_trip_gives_identical_logits(saved) -> None:
    vlm, path = saved
    loaded = model.load(path)
    ids, pics = torch.tensor([[1, 4, IMG, 6]]), torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(vlm(input_ids=ids, images=pics).logits, loaded(input_ids=ids, images=pics).logits)


def test_layout_is_the_official_mobilevlm_one(saved) -> None:
    _, path = saved
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]  # nothing pickled
    keys = _keys(path)
    assert "lm_head.weight" in keys and "model.embed_tokens.weight" in keys
    assert "model.layers.0.self_attn.q_proj.weight" in keys
    assert "model.mm_projector.model.mb_block.1.block.1.fc1.weight" in keys
    assert "model.vision_tower.vision_tower.vision_model.encoder.layers.0.self_attn.k_proj.weight" in keys
    prefixes = ("lm_head.", "model.embed_tokens.", "model.layers.", "model.norm.", "model.mm_projector.",
                "model.vision_tower.vision_tower.vision_model.")  # fmt: skip
    assert all(k.startswith(prefixes) for k in keys)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "mobilevlm"
    assert config["mm_projector_type"] == "ldpnet"
    assert config["mm_hidden_size"] == 32
    assert config["mm_vision_select_layer"] == -2
    assert config["mm_vision_select_feature"] == "patch"
    assert config["image_aspect_ratio"] == "pad"
    assert config["mm_vision_tower"] == "tiny-vit"
    assert config["tie_word_embeddings"] is False and config["num_hidden_layers"] == 2


def test_transformers_llama_loads_the_language_part(saved) -> None:
    from transformers import LlamaForCausalLM

    vlm, path = saved
    llama = LlamaForCausalLM.from_pretrained(str(path)).eval()
    ids = torch.tensor([[1, 7, 8, 9, 10]])
    with torch.no_grad():
        torch.testing.assert_close(llama(ids).logits, vlm(input_ids=ids).logits, rtol=0, atol=1e-6)


def test_language_model_checkpoint_is_plain_llama(tmp_path: Path) -> None:
    llm = model.build("tiny-llama")
    model.save(llm, tmp_path / "llm")
    config = json.loads((tmp_path / "llm" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert not any(k.startswith("mm_") for k in config)
    assert model.load(tmp_path / "llm").config.is_multimodal is False


def test_missing_and_unexpected_keys_are_named(saved, tmp_path: Path) -> None:
    _, path = saved
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((path / "config.json").read_text())
    state = model.load(path).state_dict()
    state.pop("model.mm_projector.model.mlp.1.bias")
    state["model.extra.weight"] = torch.zeros(2)
    save_file({k: v.contiguous() for k, v in state.items()}, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        model.load(broken)
    assert "1 missing keys: model.mm_projector.model.mlp.1.bias" in str(err.value)
    assert "1 unexpected keys: model.extra.weight" in str(err.value)


def test_shape_mismatch_is_named(saved, tmp_path: Path) -> None:
    _, path = saved
    other = tmp_path / "other"
    other.mkdir()
    config = json.loads((path / "config.json").read_text())
    config["vocab_size"] = 999
    (other / "config.json").write_text(json.dumps(config))
    (other / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    with pytest.raises(
        CheckpointError, match=r"lm_head.weight: checkpoint \(1024, 64\) vs model \(999, 64\)"
    ):
        model.load(other)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        model.load(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        model.load(tmp_path)


def test_authors_config_resolves_the_clip_tower_by_hub_id() -> None:
    # The released config.json names the tower by hub id and has no vision_config.
    config = MobileVLMConfig(
        mm_vision_tower="openai/clip-vit-large-patch14-336", mm_projector_type="ldpnet", mm_hidden_size=1024
    )
    row = vision_row(config)
    assert (row.n_layer, row.hidden, row.image_size, row.patch_size, row.num_tokens) == (
        24,
        1024,
        336,
        14,
        576,
    )
    with pytest.raises(ValueError, match="not in the vision table"):
        vision_row(MobileVLMConfig(mm_vision_tower="someone/unknown-vit", mm_projector_type="ldpnet"))


AUTHORS_KEYS = {
    # key: (value for mobilevlm-1.7b, value for mobilevlm-v2-1.7b); what reads it in the authors' code
    "model_type": ("mobilevlm", "mobilevlm"),  # MobileVLMConfig.model_type, AutoConfig
    "architectures": (["MobileLlamaForCausalLM"], ["MobileLlamaForCausalLM"]),
    "mm_vision_tower": ("openai/clip-vit-large-patch14-336",) * 2,  # build_vision_tower: hub id or path
    "vision_tower_type": ("clip", "clip"),  # build_vision_tower: only "clip" is built
    "mm_vision_select_layer": (-2, -2),  # CLIPVisionTower.select_layer
    "mm_vision_select_feature": ("patch", "patch"),
    "mm_hidden_size": (1024, 1024),  # build_vision_projector
    "hidden_size": (2048, 2048),
    "mm_projector_type": ("ldpnet", "ldpnetv2"),  # build_vision_projector; load_pretrained_model's 'v2'
    "mm_use_im_start_end": (False, False),  # load_pretrained_model (default False), eval scripts
    "mm_use_im_patch_token": (False, False),  # load_pretrained_model: default True adds a token
    "use_mm_proj": (True, True),
    "tune_mm_mlp_adapter": (False, False),  # prepare_inputs_labels_for_multimodal
    "image_aspect_ratio": ("pad", "pad"),  # process_images
    "max_sequence_length": (2048, 2048),  # load_pretrained_model's context_len (else 2048)
}


@pytest.mark.parametrize("row", ["mobilevlm-1.7b", "mobilevlm-v2-1.7b"])
def test_a_saved_config_has_every_key_the_authors_loader_reads(row: str, tmp_path: Path) -> None:
    """Their ``load_pretrained_model`` and ``build_vision_tower`` read these keys with ``getattr``
    defaults that differ from what our checkpoints are (a patch token, a non-clip tower)."""
    from model.config import VLM_CONFIGS
    from model.mobilevlm import hf_config

    hf_config(VLM_CONFIGS[row]).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    index = 0 if row == "mobilevlm-1.7b" else 1
    for key, values in AUTHORS_KEYS.items():
        assert saved.get(key, "<absent>") == values[index], key


def test_equal_weights_give_equal_bytes(saved, tmp_path: Path) -> None:
    """Stage identities hash the previous stage's weights file: saving must be byte-deterministic."""
    from tasks.core.identity import sha256_file

    module, _ = saved
    digests = {sha256_file(model.save(module, tmp_path / f"copy{i}") / "model.safetensors") for i in range(8)}
    assert len(digests) == 1


def test_authors_bin_shards_load_and_a_malicious_pickle_is_refused(tmp_path: Path) -> None:
    """The authors' ``pytorch_model*.bin`` shards are read with ``weights_only=True``: tensors load, a
    pickle that would run code on load is refused (and does not run)."""
    import pickle

    from model.checkpoint import read_state_dict

    good = tmp_path / "good"
    good.mkdir()
    tensors = {"model.embed_tokens.weight": torch.arange(12.0).view(3, 4), "lm_head.weight": torch.ones(2, 4)}
    torch.save(dict(list(tensors.items())[:1]), good / "pytorch_model-00001-of-00002.bin")
    torch.save(dict(list(tensors.items())[1:]), good / "pytorch_model-00002-of-00002.bin")
    loaded = read_state_dict(good)
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[k], v) for k, v in tensors.items())

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save({"w": torch.zeros(1), "payload": Exploit()}, bad / "pytorch_model.bin", pickle_module=pickle)
    with pytest.raises(pickle.UnpicklingError):
        read_state_dict(bad)
    assert not marker.exists()
