"""Model smoke run: build the tiny MobileVLM, take training steps, generate on a generated image."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from model.image import COLOURS, square_image

log = logging.getLogger(__name__)

CAPTIONS = [f"a {colour} square on a white background" for colour in COLOURS]


@dataclass
class SmokeResult:
    """What the smoke run measured."""

    model: str
    """Config row that was built."""
    overrides: dict[str, int]
    """Overrides applied to the row (the vocabulary follows the trained tokenizer)."""
    params: int
    """Total parameters."""
    trainable: int
    """Parameters that received gradients (the vision tower stays frozen)."""
    losses: list[float]
    """Training loss at each step."""
    generated: str
    """Greedy answer for the generated image."""
    seconds: float
    """Wall time of the run."""


def run_smoke(name: str = "mobilevlm-tiny", steps: int = 3, seed: int = 0) -> SmokeResult:
    """Build ``name`` with a freshly trained tiny tokenizer, train ``steps`` steps, generate once."""
    import model
    from model.conversation import build_prompt, tokenize_conversation, tokenize_prompt
    from model.image import preprocess_images
    from model.tokenizer import train_tokenizer
    from tasks.train.loader import collate

    start = time.perf_counter()
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(CAPTIONS * 8 + ["what is in the picture?"], vocab_size=300)
    vlm = model.build(name, vocab_size=len(tokenizer))
    size = vlm.config.vision_config["image_size"]
    samples = [
        tokenize_conversation(
            [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": c}], tokenizer, "plain"
        )
        for c in CAPTIONS
    ]
    batch = collate([{**s, "image": None} for s in samples], pad_id=0)
    images = preprocess_images([square_image(c, size) for c in COLOURS], size, "pad")
    optimizer = torch.optim.AdamW([p for p in vlm.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    vlm.train()
    for step in range(steps):
        loss = vlm(**batch, images=images).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        log.info("step %d loss %.4f", step, losses[-1])
    vlm.eval()
    prompt = torch.tensor([tokenize_prompt(build_prompt("", "plain", with_image=True), tokenizer)])
    out = vlm.generate(input_ids=prompt, images=images[:1], max_new_tokens=8, do_sample=False)
    return SmokeResult(
        model=name,
        overrides={"vocab_size": len(tokenizer)},
        params=sum(p.numel() for p in vlm.parameters()),
        trainable=sum(p.numel() for p in vlm.parameters() if p.requires_grad),
        losses=losses,
        generated=tokenizer.decode(out[0], skip_special_tokens=True),
        seconds=time.perf_counter() - start,
    )
