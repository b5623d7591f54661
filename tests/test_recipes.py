"""Recipes: the paper's hyperparameters, every stage resolvable, DeepSpeed configs generated."""

from __future__ import annotations

import dataclasses

import pytest

import model
from model.config import config_names, get_config
from tasks.data.specs import load_all
from tasks.train.deepspeed_config import deepspeed_config
from tasks.train.recipes import get_recipe, load_recipes, stage_dict


@pytest.mark.parametrize("name", sorted(load_recipes()))
def test_every_recipe_row_is_consistent(name: str) -> None:
    recipe = get_recipe(name)
    specs = load_all()
    assert [s.name for s in recipe.stages] == ["llm-pretrain", "llm-sft", "vlm-align", "vlm-instruct"]
    for stage in recipe.stages:
        assert stage.model in config_names()
        assert all(d.spec in specs for d in stage.datasets)
        assert stage.grad_accum >= 1
        config = deepspeed_config(stage, use_gpu=False)
        one_rank = stage.num_workers == 1 and stage.zero_stage in (1, 2)  # nothing to partition
        assert config["zero_optimization"]["stage"] == (0 if one_rank else stage.zero_stage)
        assert (
            config["train_micro_batch_size_per_gpu"]
            * config["gradient_accumulation_steps"]
            * (stage.num_workers)
            == stage.global_batch
        )
        assert config["bf16"]["enabled"] is False  # no GPU here
    assert set(recipe.stage("vlm-align").train) <= {"projector", "llm", "vision"}
    assert recipe.stage("vlm-instruct").train == ("projector", "llm")
    first = recipe.enabled_stages()[0]
    assert first.init is not None, f"{name}: the first enabled stage needs a start point"
    for stage in recipe.enabled_stages():  # every stage's model row builds (shapes only)
        module = model.build(stage.model, device="meta")
        assert sum(p.numel() for p in module.parameters()) > 0


def test_one_rank_trains_without_zero_partitions_except_zero_3() -> None:
    stage = get_recipe("tiny").stage("vlm-instruct")
    assert deepspeed_config(stage, False)["zero_optimization"]["stage"] == 2  # 2 workers
    alone = dataclasses.replace(stage, num_workers=1, global_batch=stage.micro_batch * stage.grad_accum)
    assert deepspeed_config(alone, False)["zero_optimization"] == {"stage": 0}
    offloadable = dataclasses.replace(alone, zero_stage=3)
    assert deepspeed_config(offloadable, False)["zero_optimization"]["stage"] == 3


def test_tiny_v2_is_tiny_with_the_v2_projector() -> None:
    """Same data and language-model stages (shared builds), LDPv2 for the VLM, and V2's pre-training:
    the language model trains beside the projector, at its own (50x lower) rate."""
    tiny, v2 = get_recipe("tiny"), get_recipe("tiny-v2")
    assert [s.name for s in v2.stages] == [s.name for s in tiny.stages]
    for a, b in zip(tiny.stages, v2.stages, strict=True):
        if a.name == "vlm-align":
            assert (a.train, b.train) == (("projector",), ("projector", "llm"))
            assert (b.optim.lr, b.optim.projector_lr) == (1e-4, a.optim.lr) and a.optim.projector_lr is None
            assert dataclasses.replace(b, model=a.model, train=a.train, optim=a.optim) == a
        elif a.name == "vlm-instruct":
            assert (a.model, b.model) == ("mobilevlm-tiny-336", "mobilevlm-v2-tiny-336")
            assert dataclasses.replace(b, model=a.model) == a
        else:
            assert stage_dict(a) == stage_dict(b)  # equal rows (the stage identity adds the recipe name)
    v1_row, v2_row = get_config("mobilevlm-tiny-336"), get_config("mobilevlm-v2-tiny-336")
    assert (v1_row.projector, v2_row.projector) == ("ldpnet", "ldpnetv2")
    assert (v1_row.llm, v1_row.vision) == (v2_row.llm, v2_row.vision)
    assert v2_row.visual_tokens == v1_row.visual_tokens == 144  # 24x24 patches pooled to 12x12


def test_mobilevlm_1_7b_matches_the_paper() -> None:
    r = get_recipe("mobilevlm-1.7b")
    pre = r.stage("llm-pretrain")
    assert (pre.optim.lr, pre.optim.min_lr, pre.optim.betas, pre.optim.weight_decay) == (
        3e-4,
        3e-5,
        (0.9, 0.95),
        0.1,
    )
    assert (pre.optim.grad_clip, pre.optim.warmup_steps, pre.zero_stage) == (1.0, 2000, 1)
    assert pre.global_batch * pre.seq_len == 5_242_880 and pre.max_tokens == 1_300_000_000_000
    align, it = r.stage("vlm-align"), r.stage("vlm-instruct")
    assert (align.optim.lr, align.global_batch, align.epochs, align.optim.warmup_ratio, align.zero_stage) == (
        1e-3, 256, 1, 0.03, 2)  # fmt: skip
    assert (align.template, it.template) == ("plain", "v1")
    assert (it.optim.lr, it.global_batch, it.epochs, it.zero_stage) == (2e-5, 128, 1, 2)
    assert get_recipe("mobilevlm-3b").stage("vlm-instruct").zero_stage == 3
    assert get_recipe("mobilevlm-3b").stage("vlm-instruct").optim.lr == 4e-5


def test_paper_recipes_build_on_the_chat_model() -> None:
    """The released MobileVLMs are built on MobileLLaMA-*-Chat: the v1 paper rows run the authors' SFT
    (mobilellama/sft/*.sh), the V2 rows and *-from-chat start from the released Chat model."""
    for name, data, lr, epochs in (("mobilevlm-1.7b", "sharegpt-wasteland", 2e-5, 3),
                                   ("mobilevlm-3b", "sharegpt-v4.3", 3e-5, 2)):  # fmt: skip
        sft = get_recipe(name).stage("llm-sft")
        assert sft.enabled and [d.spec for d in sft.datasets] == [data]
        assert (sft.optim.lr, sft.optim.warmup_ratio, sft.global_batch, sft.epochs) == (lr, 0.04, 256, epochs)
    small, large = "mtgv/MobileLLaMA-1.4B-Chat", "mtgv/MobileLLaMA-2.7B-Chat"
    chats = {"mobilevlm-v2-1.7b": small, "mobilevlm-v2-3b": large, "mobilevlm-1.7b-from-chat": small}
    for name, chat in chats.items():
        recipe = get_recipe(name)
        assert [s.name for s in recipe.enabled_stages()] == ["vlm-align", "vlm-instruct"]
        assert recipe.stage("vlm-align").init == chat


def test_v2_recipes_match_the_authors_run_sh() -> None:
    for name, row, zero in (
        ("mobilevlm-v2-1.7b", "mobilevlm-v2-1.7b", 3),
        ("mobilevlm-v2-3b", "mobilevlm-v2-3b", 3),
    ):
        r = get_recipe(name)
        pre, ft = r.stage("vlm-align"), r.stage("vlm-instruct")
        assert (pre.model, ft.model) == (row, row) and get_config(row).projector == "ldpnetv2"
        assert [d.spec for d in pre.datasets] == ["sharegpt4v-pt"] and pre.train == ("projector", "llm")
        assert (pre.optim.lr, pre.optim.projector_lr, pre.optim.warmup_ratio, pre.optim.weight_decay) == (
            2e-5, 1e-3, 0.03, 0.0)  # fmt: skip
        assert (pre.global_batch, pre.epochs, pre.zero_stage, pre.template, pre.seq_len) == (
            256,
            1,
            2,
            "plain",
            2048,
        )
        assert [d.spec for d in ft.datasets] == ["mobilevlm-v2-ft-mix2m"]
        assert (ft.optim.lr, ft.global_batch, ft.epochs, ft.zero_stage, ft.template) == (
            4e-5,
            128,
            1,
            zero,
            "v1",
        )
        assert ft.group_by_modality_length and r.eval_sets == (
            "gqa",
            "sqa",
            "textvqa",
            "pope",
            "mme",
            "mmbench",
        )


def test_lora_rows_use_the_authors_rates() -> None:
    for name, lr in (
        ("mobilevlm-1.7b-lora", 1e-4),
        ("mobilevlm-3b-lora", 2e-4),
        ("mobilevlm-v2-1.7b-lora", 2e-4),
    ):
        stage = get_recipe(name).stage("vlm-instruct")
        assert stage.lora is not None and (stage.lora.r, stage.lora.alpha, stage.optim.lr) == (128, 256, lr)
        assert stage.train == ("projector", "llm")  # the projector trains beside the adapters


def test_lora_option_and_overrides() -> None:
    from tasks.train.recipes import LoraConfig

    lora = LoraConfig()
    assert (lora.r, lora.alpha) == (128, 256)
    r = get_recipe("tiny", **{"vlm-instruct": {"lora": lora}})
    assert r.stage("vlm-instruct").lora == lora
    with pytest.raises(KeyError, match="known recipes"):
        get_recipe("mobilevlm-7b")


def test_lora_merges_back_into_plain_weights() -> None:
    import torch

    import model
    from model.lora import apply_lora, merge_lora

    torch.manual_seed(0)
    llm = model.build("tiny-llama")
    ids = torch.tensor([[1, 5, 9, 13]])
    assert apply_lora(llm, 8, 16, 0.0, ("q_proj", "v_proj")) == 4
    for name, p in llm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    with torch.no_grad():
        before = llm(input_ids=ids).logits
        assert merge_lora(llm) == 4
        after = llm(input_ids=ids).logits
    torch.testing.assert_close(before, after, rtol=1e-5, atol=1e-5)
    assert set(llm.state_dict()) == set(model.build("tiny-llama").state_dict())


def test_old_checkpoints_are_pruned(tmp_path) -> None:
    from model.train import prune_checkpoints

    for step in (2, 4, 6, 10, 8):
        (tmp_path / f"step-{step}").mkdir()
    (tmp_path / "latest").write_text("step-10")
    deleted = prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in deleted) == ["step-2", "step-4", "step-6"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-10", "step-8"]


def test_stages_to_retrain_follow_from_and_force_and_refuse_unknown_names() -> None:
    """``mvlm retrain --from S`` is S and every later stage; ``--force S`` is S alone; a typo is refused."""
    recipe = get_recipe("tiny")
    assert [s.name for s in recipe.enabled_stages()] == ["llm-pretrain", "vlm-align", "vlm-instruct"]
    assert recipe.stages_to_retrain(None) == ()
    assert recipe.stages_to_retrain("vlm-align") == ("vlm-align", "vlm-instruct")
    assert recipe.stages_to_retrain("llm-pretrain") == ("llm-pretrain", "vlm-align", "vlm-instruct")
    assert recipe.stages_to_retrain(None, ["vlm-align"]) == ("vlm-align",)
    assert recipe.stages_to_retrain("vlm-instruct", ["llm-pretrain"]) == ("llm-pretrain", "vlm-instruct")
    with pytest.raises(ValueError, match=r"--from 'vlm_align': recipe tiny has no enabled stage"):
        recipe.stages_to_retrain("vlm_align")
    with pytest.raises(ValueError, match=r"--force 'pretrain'.*'llm-pretrain', 'vlm-align'"):
        recipe.stages_to_retrain(None, ["vlm-align", "pretrain"])
