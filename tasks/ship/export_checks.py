"""The export's checks: PyTorch against llama.cpp on the same inputs.

``check_logits`` (f32 GGUF logits vs PyTorch on the same tokens), ``check_image_embeddings``
(llama.cpp's mmproj output vs PyTorch) and ``check_multimodal_agreement`` (greedy answers through
llama.cpp vs PyTorch on held-out questions about generated images). ``export_checkpoint(check=True)``
runs the ones that apply and keeps their results in the export's manifest.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

CHECK_TEXT = "A red fox in the snow. What is in the picture? It is a small dog on the grass."
"""Prompt of the logits check (any text works; the tiny tokenizer covers these words)."""
HELD_OUT_QUESTIONS: tuple[str, ...] = (
    "What color is the square?",
    "What is in the picture?",
    "Describe the image.",
    "What do you see?",
)
"""Questions of the multimodal agreement check (not used when training the tiny test model)."""


@dataclass(frozen=True)
class LogitCheck:
    """PyTorch vs llama.cpp logits on one prompt."""

    n_tokens: int
    """Prompt length."""
    max_abs_diff: float
    """Largest absolute logit difference over all positions and the vocabulary."""
    logit_scale: float
    """Largest absolute PyTorch logit (for reading the difference)."""
    argmax_agreement: float
    """Fraction of positions whose top token agrees."""
    tokenizer_agrees: bool
    """Whether llama.cpp tokenises the prompt to the same ids as our tokenizer."""


def _torch_model(checkpoint: Path) -> Any:
    import model

    return model.load(checkpoint).float().eval()


def check_logits(checkpoint: Path, gguf_path: Path, text: str = CHECK_TEXT, threads: int = 1) -> LogitCheck:
    """Logits of the GGUF through llama.cpp (f32 KV cache) against our PyTorch model on the same ids."""
    import numpy as np
    import torch

    from model.tokenizer import load_tokenizer
    from tasks.ship.llama_cpp import LlamaCpp, RuntimeOptions

    ids = load_tokenizer(checkpoint)(text)["input_ids"]
    with torch.no_grad():
        ours = _torch_model(checkpoint)(torch.tensor([ids])).logits[0].numpy()
    with LlamaCpp(
        gguf_path, RuntimeOptions(n_ctx=max(64, len(ids)), threads=threads, f32_kv=True)
    ) as runtime:
        theirs = runtime.all_logits(ids)
        agrees = runtime.tokenize(text) == ids
    return LogitCheck(
        n_tokens=len(ids),
        max_abs_diff=float(np.abs(ours - theirs).max()),
        logit_scale=float(np.abs(ours).max()),
        argmax_agreement=float((ours.argmax(-1) == theirs.argmax(-1)).mean()),
        tokenizer_agrees=agrees,
    )


def generated_image(colour: str, size: int) -> Image.Image:
    """A generated image: a coloured square on white (as the model smoke run uses)."""
    from model.image import square_image

    return square_image(colour, size)


@dataclass(frozen=True)
class EmbeddingCheck:
    """PyTorch vs llama.cpp projector outputs for one generated image."""

    n_tokens: int
    """Visual tokens per image."""
    max_abs_diff: float
    """Largest difference to our model (CLS first, as CLIP): the true PyTorch-vs-llama.cpp gap."""
    mean_abs_diff: float
    """Mean difference to our model over all visual tokens and channels."""
    max_abs_diff_cls_last: float
    """Largest difference to our model run in llama.cpp's CLS-last token order (``cls_last_features``)."""
    scale: float
    """Largest absolute value of our projector output."""


def cls_last_features(tower: Any, pixels: Any) -> Any:
    """Our CLIP tower computed the way the llama.cpp bundled with llama-cpp-python 0.3.36 does it.

    Its llava graph appends the class embedding after the patches but adds position embeddings
    0..n and picks rows 1..n as if CLS came first (llama.cpp issue #25814), so every patch gets its
    neighbour's position embedding and the projector sees CLS in the last slot. Used to show that
    our mmproj tensors are right and the remaining difference is that graph.
    """
    import torch

    clip = tower.vision_tower.vision_model
    emb = clip.embeddings
    patches = emb.patch_embedding(pixels.to(emb.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
    cls = emb.class_embedding.expand(pixels.shape[0], 1, -1)
    hidden = clip.pre_layrnorm(torch.cat([patches, cls], dim=1) + emb.position_embedding.weight[None])
    for layer in clip.encoder.layers[: tower.cfg.n_layer + tower.cfg.select_layer + 1]:
        out = layer(hidden, None)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden[:, 1:]


def check_image_embeddings(checkpoint: Path, llm: Path, mmproj: Path, colour: str = "red") -> EmbeddingCheck:
    """llama.cpp's image embeddings for a generated image against ours (and against the CLS-last variant)."""
    import numpy as np
    import torch

    from model.image import preprocess_images
    from tasks.ship.llama_cpp import LlamaCpp, RuntimeOptions

    vlm = _torch_model(checkpoint)
    size = vlm.config.vision_config["image_size"]
    image = generated_image(colour, size)
    pixels = preprocess_images([image], size, "pad")
    with torch.no_grad():
        ours = vlm.encode_images(pixels)[0].numpy()
        emulated = vlm.model.mm_projector(cls_last_features(vlm.model.vision_tower, pixels))[0].numpy()
    with LlamaCpp(llm, RuntimeOptions(n_ctx=512, threads=1), mmproj) as runtime:
        theirs = runtime.image_embeddings(image, vlm.config.hidden_size)
    return EmbeddingCheck(
        n_tokens=int(theirs.shape[0]),
        max_abs_diff=float(np.abs(ours - theirs).max()),
        mean_abs_diff=float(np.abs(ours - theirs).mean()),
        max_abs_diff_cls_last=float(np.abs(emulated - theirs).max()),
        scale=float(np.abs(ours).max()),
    )


@dataclass(frozen=True)
class AgreementCheck:
    """Greedy answers through llama.cpp vs PyTorch."""

    n: int
    """Question/image pairs asked."""
    agreement_rate: float
    """Fraction of pairs with identical greedy answers."""
    max_new_tokens: int
    """Answer length cap."""
    answers: list[dict[str, str]]
    """Per pair: question, colour, both answers."""


def check_multimodal_agreement(
    checkpoint: Path,
    llm: Path,
    mmproj: Path,
    questions: Sequence[str] = HELD_OUT_QUESTIONS,
    colours: Sequence[str] = ("red", "green", "blue", "yellow"),
    max_new_tokens: int = 8,
    template: str = "v1",
) -> AgreementCheck:
    """Ask each question about each generated image through both runtimes; count identical answers."""
    from tasks.ship.llama_cpp import LlamaCpp, RuntimeOptions

    vlm = _torch_model(checkpoint)
    tokenizer = _tokenizer(checkpoint)
    size = vlm.config.vision_config["image_size"]
    answers = []
    with LlamaCpp(llm, RuntimeOptions(n_ctx=1024, threads=1, f32_kv=True), mmproj) as runtime:
        for colour in colours:
            image = generated_image(colour, size)
            for question in questions:
                ours = _torch_answer(vlm, tokenizer, question, image, template, max_new_tokens)
                theirs = _llamacpp_answer(runtime, tokenizer, question, image, template, max_new_tokens)
                answers.append({"question": question, "colour": colour, "pytorch": ours, "llama_cpp": theirs})
    same = sum(a["pytorch"] == a["llama_cpp"] for a in answers)
    return AgreementCheck(len(answers), same / max(1, len(answers)), max_new_tokens, answers)


def _tokenizer(checkpoint: Path) -> Any:
    from model.tokenizer import load_tokenizer

    return load_tokenizer(checkpoint)


def _prompt_segments(tokenizer: Any, question: str, template: str) -> tuple[list[int], list[int]]:
    """Token ids before and after ``<image>`` in the inference prompt (our tokenisation)."""
    from model.conversation import IMAGE_TOKEN_INDEX, build_prompt, tokenize_prompt

    ids = tokenize_prompt(build_prompt(question, template, with_image=True), tokenizer)
    at = ids.index(IMAGE_TOKEN_INDEX)
    return ids[:at], ids[at + 1 :]


def _torch_answer(vlm: Any, tokenizer: Any, question: str, image: Image.Image, template: str, n: int) -> str:
    import torch

    from model.conversation import IMAGE_TOKEN_INDEX
    from model.image import preprocess_images

    before, after = _prompt_segments(tokenizer, question, template)
    ids = torch.tensor([[*before, IMAGE_TOKEN_INDEX, *after]])
    pixels = preprocess_images([image], vlm.config.vision_config["image_size"], vlm.config.image_aspect_ratio)
    out = vlm.generate(input_ids=ids, images=pixels, max_new_tokens=n, do_sample=False)
    return tokenizer.decode(out[0], skip_special_tokens=True).strip()


def _llamacpp_answer(
    runtime: Any, tokenizer: Any, question: str, image: Image.Image, template: str, n: int
) -> str:
    before, after = _prompt_segments(tokenizer, question, template)
    runtime.reset()
    runtime.eval_segments([before, image, after])
    return tokenizer.decode(runtime.greedy(n), skip_special_tokens=True).strip()
