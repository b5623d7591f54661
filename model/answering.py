"""Batched greedy answers of a MobileVLM to prompts, with or without an image (KV cache on).

The next batch's prompts are tokenised and its images preprocessed on a helper thread while the
current batch decodes (PIL's resize and numpy's lookups release the GIL), as LLaVA's evaluation
overlaps its data loader with the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from model.conversation import tokenize_prompt
from model.image import preprocess_images
from model.prefetch import ahead


@torch.no_grad()
def greedy_answers(
    vlm: Any, tokenizer: Any, prompts: Sequence[str], images: Sequence[Image.Image | None],
    max_new_tokens: int, batch: int = 16,
) -> list[str]:  # fmt: skip
    """The decoded answer to each rendered prompt (``<image>`` where its image goes), greedy, in
    batches of prompts that all have an image or all have none, left-padded."""
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
    vlm.eval()
    vision = vlm.config.vision_config or {}
    size, mode = vision.get("image_size", 0), vlm.config.image_aspect_ratio

    def prepare(chunk: list[int], with_image: bool) -> tuple[list[list[int]], torch.Tensor | None]:
        ids = [tokenize_prompt(prompts[i], tokenizer) for i in chunk]
        return ids, preprocess_images([images[i] for i in chunk], size, mode) if with_image else None

    answers: list[str | None] = [None] * len(prompts)
    for (chunk, _), (ids, pixels) in ahead(_batches(images, batch), lambda b: prepare(*b)):
        tokens = _generate(vlm, tokenizer, ids, pixels, max_new_tokens)
        for i, row in zip(chunk, tokens, strict=True):
            answers[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    return [a or "" for a in answers]


def _batches(images: Sequence[Any], batch: int) -> list[tuple[list[int], bool]]:
    """(prompt indices, with image) per batch: first every prompt with an image, then the rest."""
    out = []
    for with_image in (True, False):
        order = [i for i, img in enumerate(images) if (img is not None) == with_image]
        out += [(order[start : start + batch], with_image) for start in range(0, len(order), batch)]
    return out


def _generate(vlm: Any, tokenizer: Any, ids: list[list[int]], pixels: torch.Tensor | None,
              max_new_tokens: int) -> torch.Tensor:  # fmt: skip
    longest = max(map(len, ids))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (longest - len(p)) + p for p in ids])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in ids])
    out = vlm.generate(
        input_ids=input_ids, attention_mask=mask, images=pixels, max_new_tokens=max_new_tokens,
        do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    return out if pixels is not None else out[:, longest:]
