"""Per-part learning rates and the authors' LoRA, through the real DeepSpeed engine (ZeRO-2 on CPU, one
gloo rank in a subprocess, with the tiny recipe's vlm-instruct DeepSpeed config).

At the first Adam step every parameter with a gradient moves by about its group's rate (m / sqrt(v)
is +-1 after bias correction), so the largest change of each part measures the rate it trained at.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.train.recipe_schema import OptimConfig, stage_dict
from tasks.train.recipes import get_recipe

PROBE = Path(__file__).with_name("deepspeed_probe.py")


def _probe(mode: str, tmp_path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, str(PROBE), mode], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


@pytest.mark.slow
def test_the_projector_trains_at_its_own_rate_through_deepspeed(tmp_path: Path) -> None:
    result = _probe("groups", tmp_path)
    names = {name: lr for name, lr, _ in result["groups"]}  # after one step of the cosine: x 0.978
    expected = {"llm": 1e-3, "llm/no_decay": 1e-3, "projector": 1e-2, "projector/no_decay": 1e-2}
    assert names == pytest.approx({k: v * 0.97798 for k, v in expected.items()}, rel=1e-4)
    lrs = result["lrs"]  # logged per part beside ``lr``
    assert sorted(lrs) == ["lr/llm", "lr/projector"]
    assert lrs["lr/projector"] == pytest.approx(10 * lrs["lr/llm"])
    moved = result["moved"]
    assert moved["projector"] == pytest.approx(1e-2, rel=0.05)
    assert moved["llm"] == pytest.approx(1e-3, rel=0.05) and moved["lm_head"] == pytest.approx(1e-3, rel=0.05)
    assert moved["vision"] == 0.0  # frozen


@pytest.mark.slow
def test_lora_trains_adapters_and_projector_with_lm_head_and_embeddings_frozen(tmp_path: Path) -> None:
    """As the authors' LoRA runs: peft freezes the language model, the projector is unfrozen beside it."""
    moved = _probe("lora", tmp_path)["moved"]
    assert moved["lora"] > 0 and moved["projector"] == pytest.approx(1e-3, rel=0.05)
    assert moved["lm_head"] == moved["embed"] == moved["llm"] == moved["vision"] == 0.0


def test_part_rates_are_recipe_fields_that_leave_older_identities_alone() -> None:
    plain = get_recipe("tiny").stage("vlm-align")
    assert "projector_lr" not in stage_dict(plain)["optim"]  # at the default: not in the identity
    faster = get_recipe("tiny", **{"vlm-align": {"optim": OptimConfig(lr=2e-3, projector_lr=1e-2)}})
    assert stage_dict(faster.stage("vlm-align"))["optim"]["projector_lr"] == 1e-2


def test_the_vision_tower_trains_only_when_named() -> None:
    import torch

    import model as mvlm
    from model.train import set_trainable

    vlm = mvlm.build("mobilevlm-tiny", vocab_size=64)
    tower = vlm.model.vision_tower
    set_trainable(vlm, ("projector",))
    assert tower.frozen and not any(p.requires_grad for p in tower.parameters())
    set_trainable(vlm, ("vision", "projector"))
    assert not tower.frozen and all(p.requires_grad for p in tower.parameters())
    ids = torch.tensor([[1, -200, 5, 6]])
    labels = torch.tensor([[-100, -100, 5, 6]])
    vlm(input_ids=ids, labels=labels, images=torch.randn(1, 3, 56, 56)).loss.backward()
    assert all(p.grad is not None for p in tower.vision_tower.vision_model.encoder.layers[0].parameters())
    with pytest.raises(ValueError, match="trains the vision tower but the model has none"):
        set_trainable(mvlm.build("tiny-llama", vocab_size=64), ("vision",))


def test_merged_lora_weights_are_a_plain_checkpoint_that_llama_cpp_runs(tmp_path: Path) -> None:
    """A LoRA stage saves merged weights: the same logits as the adapters gave, the standard layout,
    and a GGUF whose llama.cpp logits equal PyTorch's (f32 export)."""
    import torch

    import model as mvlm
    from model.lora import apply_lora, merge_lora
    from model.tokenizer import train_tokenizer
    from tasks.ship.export import ExportConfig, export_checkpoint

    tokenizer = train_tokenizer(["a red circle is on the left of a blue square"] * 50, vocab_size=300)
    torch.manual_seed(0)
    module = mvlm.build("tiny-llama", vocab_size=len(tokenizer)).eval()
    assert (
        apply_lora(module, 8, 16, 0.0, ("q_proj", "v_proj", "down_proj"))
        == 3 * module.config.num_hidden_layers
    )
    for name, param in module.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)  # trained adapters: not the zero start
    ids = torch.tensor([tokenizer.encode("a red circle is on the left")])
    with torch.no_grad():
        adapted = module(input_ids=ids).logits
        merge_lora(module)
        merged = module(input_ids=ids).logits
    assert torch.allclose(adapted, merged, atol=1e-5) and not any("lora" in k for k in module.state_dict())
    checkpoint = mvlm.save(module, tmp_path / "final", tokenizer=tokenizer)
    result = export_checkpoint(checkpoint, tmp_path / "export", ExportConfig(llm_dtype="f32"), check=True)
    logits = result.checks["logits"]
    assert logits["tokenizer_agrees"] and logits["argmax_agreement"] == 1.0
    assert logits["max_abs_diff"] < 1e-3 * max(1.0, logits["logit_scale"])
