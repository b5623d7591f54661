"""MobileVLM wiring: image splicing, labels, mixed batches, padding sides, frozen tower, generation."""

from __future__ import annotations

import pytest
import torch

import model
from model.conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX

IMG = IMAGE_TOKEN_INDEX


@pytest.fixture(scope="module")
def vlm() -> torch.nn.Module:
    torch.manual_seed(0)
    return model.build("mobilevlm-tiny").eval()


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 56, 56, generator=torch.Generator().manual_seed(seed))


def test_splice_replaces_placeholder_with_visual_tokens_and_masks_labels(vlm) -> None:
    ids = torch.tensor([[1, 5, IMG, 7, 8]])
    labels = torch.tensor([[-100, -100, -100, 7, 8]])
    embeds, mask, positions, out_labels = vlm.splice_images(ids, None, labels, images(1))
    assert embeds.shape == (1, 4 + 4, 64)  # 4 text tokens + 4 visual tokens
    assert out_labels.tolist() == [[-100, -100] + [IGNORE_INDEX] * 4 + [7, 8]]
    assert positions.tolist() == [list(range(8))] and mask.all()
    visual = vlm.encode_images(images(1))[0]
    torch.testing.assert_close(embeds[0, 2:6], visual)
    torch.testing.assert_close(embeds[0, :2], vlm.get_input_embeddings()(torch.tensor([1, 5])))


def test_placeholder_count_must_match_images(vlm) -> None:
    with pytest.raises(ValueError, match=r"2 <image> placeholder\(s\) but 1 image"):
        vlm(input_ids=torch.tensor([[1, IMG, 4, IMG]]), images=images(1))
    with pytest.raises(ValueError, match="no images were given"):
        vlm(input_ids=torch.tensor([[1, IMG, 4]]))


def test_text_model_refuses_images() -> None:
    llm = model.build("tiny-llama")
    with pytest.raises(ValueError, match="has no vision tower"):
        llm(input_ids=torch.tensor([[1, IMG]]), images=images(1))


@pytest.mark.parametrize("side", ["right", "left"])
def test_mixed_batch_equals_samples_alone(vlm, side: str) -> None:
    vlm.config.tokenizer_padding_side = side
    try:
        ids = torch.tensor([[1, IMG, 9, 10, 11], [1, 12, 13, 0, 0], [1, 14, IMG, 15, 0]])
        mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
        pics = images(2)
        with torch.no_grad():
            batch = vlm(input_ids=ids, attention_mask=mask, images=pics).logits
            alone = [
                vlm(input_ids=ids[:1], images=pics[:1]).logits[0],
                vlm(input_ids=ids[1:2, :3]).logits[0],
                vlm(input_ids=ids[2:3, :4], images=pics[1:]).logits[0],
            ]
        for row, expected in zip(batch, alone, strict=True):
            got = row[-len(expected) :] if side == "left" else row[: len(expected)]
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    finally:
        vlm.config.tokenizer_padding_side = "right"


def test_loss_ignores_visual_tokens_and_padding(vlm) -> None:
    ids = torch.tensor([[1, IMG, 9, 10, 11]])
    labels = torch.tensor([[-100, -100, 9, 10, 11]])
    with torch.no_grad():
        out = vlm(input_ids=ids, labels=labels, images=images(1))
        logits = out.logits[0]
    # spliced: bos, 4 visual, 9, 10, 11; logits at positions 4, 5, 6 predict 9, 10, 11
    targets = torch.tensor([9, 10, 11])
    expected = torch.nn.functional.cross_entropy(logits[4:7], targets)
    torch.testing.assert_close(out.loss, expected)


def test_vision_tower_is_frozen_and_the_rest_trains() -> None:
    torch.manual_seed(0)
    vlm = model.build("mobilevlm-tiny")
    ids = torch.tensor([[1, IMG, 9, 10, 11]])
    vlm(input_ids=ids, labels=ids.clamp(min=0), images=images(1)).loss.backward()
    tower = list(vlm.model.vision_tower.parameters())
    assert tower and all(not p.requires_grad and p.grad is None for p in tower)
    assert all(p.grad is not None for p in vlm.model.mm_projector.parameters())
    assert vlm.lm_head.weight.grad is not None


def test_select_feature_cls_patch_keeps_the_cls_token() -> None:
    tower = model.build("tiny-vit", select_feature="cls_patch")
    assert tower(images(2)).shape == (2, 17, 32)
    assert model.build("tiny-vit")(images(2)).shape == (2, 16, 32)


def test_greedy_generation_is_deterministic_and_uses_the_image(vlm) -> None:
    prompt = torch.tensor([[1, 5, IMG, 7]])
    first = vlm.generate(input_ids=prompt, images=images(1), max_new_tokens=6, do_sample=False)
    again = vlm.generate(input_ids=prompt, images=images(1), max_new_tokens=6, do_sample=False)
    assert first.shape == (1, 6) and torch.equal(first, again)
    with torch.no_grad():  # the image reaches the language model: another picture, other logits
        same = vlm(input_ids=prompt, images=images(1)).logits[0, -1]
        other = vlm(input_ids=prompt, images=images(1, seed=11)).logits[0, -1]
        blank = vlm(input_ids=prompt, images=torch.zeros_like(images(1))).logits[0, -1]
    torch.testing.assert_close(same, vlm(input_ids=prompt, images=images(1)).logits[0, -1].detach())
    assert (same - other).abs().max() > 1e-4 and (same - blank).abs().max() > 1e-4


def test_cached_generation_equals_recomputing_every_step(vlm) -> None:
    prompt, pics = torch.tensor([[1, 5, IMG, 7]]), images(1, seed=3)
    cached = vlm.generate(input_ids=prompt, images=pics, max_new_tokens=5, do_sample=False)[0].tolist()
    ids = prompt
    with torch.no_grad():
        for _ in range(5):
            nxt = vlm(input_ids=ids, images=pics).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    assert cached == ids[0, 4:].tolist()


def test_batched_left_padded_generation_equals_single(vlm) -> None:
    a, b = [1, 5, IMG, 7, 8], [1, IMG, 9]
    ids = torch.tensor([a, [0, 0, *b]])
    mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    pics = images(2, seed=4)
    batch = vlm.generate(input_ids=ids, attention_mask=mask, images=pics, max_new_tokens=4, do_sample=False)
    one = vlm.generate(input_ids=torch.tensor([a]), images=pics[:1], max_new_tokens=4, do_sample=False)
    two = vlm.generate(input_ids=torch.tensor([b]), images=pics[1:], max_new_tokens=4, do_sample=False)
    assert batch.tolist() == [one[0].tolist(), two[0].tolist()]
