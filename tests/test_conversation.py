"""Tests for model.conversation: templates, tokenisation and label masking."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from model.conversation import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    IMAGE_TOKEN_INDEX,
    VICUNA_SYSTEM,
    build_prompt,
    get_template,
    move_image_to_front,
    render_conversation,
    tokenize_conversation,
    tokenize_prompt,
)

Q1, A1 = "What is in the picture?", "A red fox in the snow."
Q2, A2 = "What color is it?", "It is red."
V1_CONV = [
    {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{Q1}"},
    {"from": "gpt", "value": A1},
    {"from": "human", "value": Q2},
    {"from": "gpt", "value": A2},
]
PLAIN_CONV = [
    {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\nDescribe the image briefly."},
    {"from": "gpt", "value": A1},
]


def human(value: str) -> dict[str, str]:
    """A human turn."""
    return {"from": "human", "value": value}


def gpt(value: str) -> dict[str, str]:
    """An assistant turn."""
    return {"from": "gpt", "value": value}


def runs(ids: list[int], labels: list[int], target: bool) -> list[list[int]]:
    """Maximal runs of consecutive text tokens that are (``target=True``) or are not targets."""
    out: list[list[int]] = []
    previous = None
    for tid, label in zip(ids, labels, strict=True):
        is_target = label != IGNORE_INDEX
        if is_target == target and tid >= 0:
            if previous != target or not out:
                out.append([])
            out[-1].append(tid)
        previous = is_target if tid >= 0 else None
    return out


def check_invariants(enc: dict[str, list[int]], bos_id: int) -> None:
    """Shared structure: bos first and masked, labels either ignored or equal to the input id."""
    ids, labels = enc["input_ids"], enc["labels"]
    assert len(ids) == len(labels)
    assert ids[0] == bos_id
    assert labels[0] == IGNORE_INDEX
    assert all(label in (IGNORE_INDEX, tid) for tid, label in zip(ids, labels, strict=True))
    assert IMAGE_TOKEN_INDEX not in labels


def test_render_v1_text_and_spans() -> None:
    text, spans = render_conversation(V1_CONV, "v1")
    assert text == (f"{VICUNA_SYSTEM} USER: <image>\n{Q1} ASSISTANT: {A1}</s>USER: {Q2} ASSISTANT: {A2}</s>")
    assert [text[s:e] for s, e in spans] == [f"{A1}</s>", f"{A2}</s>"]


def test_v1_masks_everything_but_answers(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    tok = tiny_tokenizer
    enc = tokenize_conversation(V1_CONV, tok, "v1")
    ids, labels = enc["input_ids"], enc["labels"]
    check_invariants(enc, tok.bos_token_id)
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    image_at = ids.index(IMAGE_TOKEN_INDEX)
    assert labels[image_at] == IGNORE_INDEX
    # target runs: each answer with its "</s>"; the space before the answer rides on the first word as "▁"
    targets = runs(ids, labels, target=True)
    assert [tok.decode(run) for run in targets] == [f"{A1}</s>", f"{A2}</s>"]
    pieces = ["".join(tok.convert_ids_to_tokens(run)) for run in targets]
    assert pieces == ["▁A▁red▁fox▁in▁the▁snow.</s>", "▁It▁is▁red.</s>"]
    assert all(run[-1] == tok.eos_token_id for run in targets)
    # everything else (system prompt, roles, questions, separators) is masked
    masked = runs(ids[1:], labels[1:], target=False)
    assert [tok.decode(run) for run in masked] == [
        f"{VICUNA_SYSTEM} USER: ",
        f"\n{Q1} ASSISTANT:",
        f"USER: {Q2} ASSISTANT:",
    ]
    assert tok.decode(ids[1:image_at]) == f"{VICUNA_SYSTEM} USER: "
    assert sum(label != IGNORE_INDEX for label in labels) == sum(len(run) for run in targets)


def test_plain_masks_image_and_keeps_caption(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    tok = tiny_tokenizer
    enc = tokenize_conversation(PLAIN_CONV, tok, "plain")
    ids, labels = enc["input_ids"], enc["labels"]
    check_invariants(enc, tok.bos_token_id)
    assert ids[:2] == [tok.bos_token_id, IMAGE_TOKEN_INDEX]
    assert labels[:2] == [IGNORE_INDEX, IGNORE_INDEX]
    assert labels[2:] == ids[2:]  # the caption and its "\n" are all targets; the human text is dropped
    assert tok.decode(ids[2:]) == f"{A1}\n"
    assert tok.convert_ids_to_tokens(ids[-1]) == "<0x0A>"


def test_prompt_is_a_prefix_of_the_training_sequence(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    for conv, template, question in ((V1_CONV, "v1", Q1), (PLAIN_CONV, "plain", "ignored")):
        enc = tokenize_conversation(conv, tiny_tokenizer, template)
        prompt_ids = tokenize_prompt(build_prompt(question, template, with_image=True), tiny_tokenizer)
        assert enc["input_ids"][: len(prompt_ids)] == prompt_ids
        # the first target token is the one right after the prompt
        first_target = next(i for i, label in enumerate(enc["labels"]) if label != IGNORE_INDEX)
        assert first_target == len(prompt_ids)


def test_build_prompt() -> None:
    assert build_prompt(Q1, "v1", with_image=True) == f"{VICUNA_SYSTEM} USER: <image>\n{Q1} ASSISTANT:"
    assert build_prompt(Q1, "v1", with_image=False) == f"{VICUNA_SYSTEM} USER: {Q1} ASSISTANT:"
    assert build_prompt(Q1, "plain", with_image=True) == "<image>"
    with pytest.raises(ValueError, match="plain template conditions only on an image"):
        build_prompt(Q1, "plain", with_image=False)


def test_tokenize_prompt_places_image_tokens(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    ids = tokenize_prompt("<image>\nA red fox <image> in the snow.", tiny_tokenizer)
    assert ids[0] == tiny_tokenizer.bos_token_id
    assert ids[1] == IMAGE_TOKEN_INDEX
    assert ids.count(IMAGE_TOKEN_INDEX) == 2
    assert tokenize_prompt("<image>", tiny_tokenizer) == [tiny_tokenizer.bos_token_id, IMAGE_TOKEN_INDEX]


def test_multiple_images_and_text_only(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    conv = [human("<image> and <image>: which is red?"), gpt(A2)]
    enc = tokenize_conversation(conv, tiny_tokenizer, "v1")
    assert enc["input_ids"].count(IMAGE_TOKEN_INDEX) == 2
    check_invariants(enc, tiny_tokenizer.bos_token_id)
    text_only = tokenize_conversation([human(Q1), gpt(A1)], tiny_tokenizer, "v1")
    assert IMAGE_TOKEN_INDEX not in text_only["input_ids"]
    targets = runs(text_only["input_ids"], text_only["labels"], target=True)
    assert [tiny_tokenizer.decode(run) for run in targets] == [f"{A1}</s>"]


def test_truncation(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    full = tokenize_conversation(V1_CONV, tiny_tokenizer, "v1")
    short = tokenize_conversation(V1_CONV, tiny_tokenizer, "v1", max_length=10)
    assert short == {"input_ids": full["input_ids"][:10], "labels": full["labels"][:10]}
    assert tokenize_conversation(V1_CONV, tiny_tokenizer, "v1", max_length=10_000) == full
    with pytest.raises(ValueError, match="max_length must be positive"):
        tokenize_conversation(V1_CONV, tiny_tokenizer, "v1", max_length=0)


def test_move_image_to_front() -> None:
    conv = [{"from": "human", "value": "Look at this: <image> "}, {"from": "gpt", "value": "ok"}]
    assert move_image_to_front(conv) == [
        {"from": "human", "value": "<image>\nLook at this:"},
        {"from": "gpt", "value": "ok"},
    ]
    assert conv[0]["value"] == "Look at this: <image> "  # input untouched


def test_templates() -> None:
    assert get_template("v1").stop_str == "</s>"
    assert get_template("plain").stop_str == "\n"
    with pytest.raises(ValueError, match=r"unknown conversation template 'llama_3'.*\['plain', 'v1'\]"):
        get_template("llama_3")


@pytest.mark.parametrize(
    ("conv", "template", "message"),
    [
        ([], "v1", "non-empty list"),
        ([gpt("hi"), human("q")], "v1", "turn 0 is from 'gpt'"),
        ([human("q"), human("q")], "v1", "turn 1 is from 'human'"),
        ([human("q"), gpt("a"), human("q")], "v1", "ends with a human turn"),
        ([human("q"), gpt("  ")], "v1", "turn 1 .* empty"),
        ([human("q"), {"value": "a"}], "v1", "turn 1 must be a dict"),
        ([human("q"), gpt("<image>")], "v1", "only appear in human"),
        (V1_CONV, "plain", "exactly one human/gpt pair"),
        ([human("q"), gpt("a")], "plain", "must contain '<image>'"),
        (V1_CONV, "vicuna_v9", "unknown conversation template"),
    ],
)
def test_invalid_conversations(
    tiny_tokenizer: PreTrainedTokenizerFast, conv: list[dict[str, str]], template: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        tokenize_conversation(conv, tiny_tokenizer, template)
