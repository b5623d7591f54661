"""Conversation templates and tokenisation with label masking (LLaVA / MobileVLM conventions).

Conversations use the LLaVA json form: ``[{"from": "human", "value": "<image>\\nq1"}, {"from": "gpt",
"value": "a1"}, ...]``. A template renders them to one string plus the character spans that are
training targets (assistant answers and their end separator). Tokenisation splits the string on
``<image>`` (each occurrence becomes ``IMAGE_TOKEN_INDEX``), tokenises each chunk with offsets, and
marks a token as a target iff one of its characters lies inside a target span; everything else,
including ``<s>`` and the image placeholder, gets ``IGNORE_INDEX``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200
IMAGE_PLACEHOLDER = "<image>"
HUMAN_ROLE = "human"
GPT_ROLE = "gpt"

Span = tuple[int, int]
Turn = dict[str, Any]


@dataclass(frozen=True)
class ConversationTemplate:
    """A prompt format.

    ``style="plain"``: LLaVA pretraining, ``"<image>" + caption + sep`` (the human text is dropped).
    ``style="two_sep"``: Vicuna v1, ``system + sep + "R0: q" + sep + "R1: a" + sep2 + ...``.
    """

    name: str
    style: Literal["plain", "two_sep"]
    system: str = ""
    roles: tuple[str, str] = ("", "")
    sep: str = "\n"
    sep2: str = ""

    @property
    def stop_str(self) -> str:
        """The string that ends an assistant answer (what generation should stop at)."""
        return self.sep if self.style == "plain" else self.sep2


VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

TEMPLATES: dict[str, ConversationTemplate] = {
    "plain": ConversationTemplate(name="plain", style="plain", sep="\n"),
    "v1": ConversationTemplate(
        name="v1", style="two_sep", system=VICUNA_SYSTEM, roles=("USER", "ASSISTANT"), sep=" ", sep2="</s>"
    ),
}


def get_template(name: str) -> ConversationTemplate:
    """Look up a conversation template by name (``plain`` or ``v1``)."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(
            f"unknown conversation template {name!r}; known templates: {sorted(TEMPLATES)}"
        ) from None


def _check_turn(index: int, turn: Any) -> None:
    """Validate one turn's shape, role (alternating, human first) and value."""
    if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
        raise ValueError(f"turn {index} must be a dict with 'from' and 'value' keys, got {turn!r}")
    expected = HUMAN_ROLE if index % 2 == 0 else GPT_ROLE
    if turn["from"] != expected:
        raise ValueError(
            f"turn {index} is from {turn['from']!r} but {expected!r} was expected: turns must alternate "
            f"{HUMAN_ROLE!r}, {GPT_ROLE!r}, ... starting with {HUMAN_ROLE!r}"
        )
    value = turn["value"]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"turn {index} ({turn['from']}) has an empty or non-string value: {value!r}")
    if turn["from"] == GPT_ROLE and IMAGE_PLACEHOLDER in value:
        raise ValueError(
            f"turn {index} (gpt) contains {IMAGE_PLACEHOLDER!r}; images may only appear in human turns"
        )


def validate_conversation(conv: Sequence[Turn]) -> None:
    """Raise ``ValueError`` unless ``conv`` is non-empty, alternates human/gpt from human, ends with gpt."""
    if not isinstance(conv, Sequence) or isinstance(conv, str) or len(conv) == 0:
        raise ValueError(f"conversation must be a non-empty list of turns, got {conv!r}")
    for index, turn in enumerate(conv):
        _check_turn(index, turn)
    if len(conv) % 2 != 0:
        raise ValueError(
            f"conversation has {len(conv)} turns and ends with a human turn (turn {len(conv) - 1}); "
            "training conversations must end with a gpt answer"
        )


def move_image_to_front(conv: Sequence[Turn]) -> list[Turn]:
    """LLaVA's ``preprocess_multimodal``: move ``<image>`` to the front of its human turn, then a newline."""
    result = []
    for turn in conv:
        value = turn["value"]
        if turn.get("from") == HUMAN_ROLE and IMAGE_PLACEHOLDER in value:
            value = IMAGE_PLACEHOLDER + "\n" + value.replace(IMAGE_PLACEHOLDER, "").strip()
        result.append({**turn, "value": value})
    return result


def _render_plain(template: ConversationTemplate, conv: Sequence[Turn]) -> tuple[str, list[Span]]:
    """``<image>`` + caption + sep; the caption and sep are the target."""
    if len(conv) != 2:
        raise ValueError(f"the plain template takes exactly one human/gpt pair, got {len(conv)} turns")
    if IMAGE_PLACEHOLDER not in conv[0]["value"]:
        raise ValueError(
            f"turn 0 (human) must contain {IMAGE_PLACEHOLDER!r} for the plain (pretraining) template"
        )
    target = conv[1]["value"] + template.sep
    return IMAGE_PLACEHOLDER + target, [(len(IMAGE_PLACEHOLDER), len(IMAGE_PLACEHOLDER) + len(target))]


def _render_two_sep(template: ConversationTemplate, conv: Sequence[Turn]) -> tuple[str, list[Span]]:
    """Vicuna v1 rendering; each answer plus ``sep2`` is a target span."""
    user, assistant = template.roles
    text = template.system + template.sep
    spans: list[Span] = []
    for i in range(0, len(conv), 2):
        text += f"{user}: {conv[i]['value']}{template.sep}{assistant}: "
        answer = conv[i + 1]["value"] + template.sep2
        spans.append((len(text), len(text) + len(answer)))
        text += answer
    return text, spans


def render_conversation(conv: Sequence[Turn], template: str) -> tuple[str, list[Span]]:
    """Validate ``conv`` and render it with ``template``; returns the text and its target character spans."""
    tmpl = get_template(template)
    validate_conversation(conv)
    if tmpl.style == "plain":
        return _render_plain(tmpl, conv)
    return _render_two_sep(tmpl, conv)


def _tokenize_chunks(text: str, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[Span]]:
    """Tokenise ``text`` split on ``<image>``: ids (``IMAGE_TOKEN_INDEX`` per image) and char offsets."""
    ids: list[int] = []
    offsets: list[Span] = []
    start = 0
    for index, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if index > 0:
            ids.append(IMAGE_TOKEN_INDEX)
            offsets.append((start - len(IMAGE_PLACEHOLDER), start))
        if chunk:
            enc = tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True)
            ids.extend(enc["input_ids"])
            offsets.extend((start + s, start + e) for s, e in enc["offset_mapping"])
        start += len(chunk) + len(IMAGE_PLACEHOLDER)
    return ids, offsets


def _bos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's bos id, or a clear error when it has none."""
    if tokenizer.bos_token_id is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no bos_token; set bos_token (e.g. '<s>')")
    return tokenizer.bos_token_id


def _is_target(offset: Span, spans: Sequence[Span]) -> bool:
    """Whether a token's characters intersect a target span (zero-width tokens: their position is inside)."""
    s, e = offset
    if s == e:
        return any(ts <= s < te for ts, te in spans)
    return any(s < te and e > ts for ts, te in spans)


def tokenize_conversation(
    conv: Sequence[Turn],
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    max_length: int | None = None,
) -> dict[str, list[int]]:
    """Tokenise a LLaVA-format conversation into ``input_ids`` and ``labels`` (non-targets: ``IGNORE_INDEX``).

    ``input_ids`` starts with bos and holds ``IMAGE_TOKEN_INDEX`` at each ``<image>``; only the tokens of
    assistant answers and their end separator are targets. Both lists are truncated to ``max_length``.
    """
    text, spans = render_conversation(conv, template)
    ids, offsets = _tokenize_chunks(text, tokenizer)
    labels = [
        tid if tid != IMAGE_TOKEN_INDEX and _is_target(off, spans) else IGNORE_INDEX
        for tid, off in zip(ids, offsets, strict=True)
    ]
    input_ids = [_bos_id(tokenizer), *ids]
    labels = [IGNORE_INDEX, *labels]
    if max_length is not None:
        if max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def build_prompt(question: str, template: str, with_image: bool) -> str:
    """The inference prompt for ``question``: v1 ends with ``"ASSISTANT:"``; plain is just ``"<image>"``."""
    tmpl = get_template(template)
    if tmpl.style == "plain":
        if not with_image:
            raise ValueError(
                "the plain template conditions only on an image; use with_image=True or template 'v1'"
            )
        return IMAGE_PLACEHOLDER
    user, assistant = tmpl.roles
    image = IMAGE_PLACEHOLDER + "\n" if with_image else ""
    return f"{tmpl.system}{tmpl.sep}{user}: {image}{question}{tmpl.sep}{assistant}:"


def jinja_chat_template(template: str) -> str:
    """A Jinja chat template (llama.cpp's ``--jinja --chat-template-file``) that renders one user message
    exactly as ``build_prompt`` renders a question: the message is the question, with ``<image>`` (or
    llama.cpp's media marker) and a newline in front when it is about an image."""
    tmpl = get_template(template)
    if tmpl.style == "plain":
        raise ValueError(
            "the plain template has no turns to render; use a conversational template such as 'v1'"
        )
    user, assistant = tmpl.roles
    if "{" in tmpl.system + tmpl.sep:
        raise ValueError(f"template {template!r}: its system text cannot be written as Jinja text")
    return (
        f"{tmpl.system}{tmpl.sep}{{% for m in messages %}}{{% if m['role'] == 'user' %}}{user}: "
        f"{{{{ m['content'] }}}}{tmpl.sep}{{% endif %}}{{% endfor %}}"
        f"{{% if add_generation_prompt %}}{assistant}:{{% endif %}}"
    )


def tokenize_prompt(prompt: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids for generation: bos, then the chunks of ``prompt``, ``IMAGE_TOKEN_INDEX`` per ``<image>``."""
    ids, _ = _tokenize_chunks(prompt, tokenizer)
    return [_bos_id(tokenizer), *ids]


def prompt_for_round(conv: Sequence[Turn], round_index: int, template: str = "v1") -> tuple[str, str]:
    """(prompt, expected answer) for asking round ``round_index`` of ``conv`` with the earlier rounds as
    history, rendered exactly as training renders them (the prompt ends with ``"ASSISTANT:"``)."""
    tmpl = get_template(template)
    if tmpl.style == "plain":
        raise ValueError("prompt_for_round needs a conversational template such as 'v1'")
    validate_conversation(conv)
    if not 0 <= round_index < len(conv) // 2:
        raise ValueError(f"round {round_index} out of range: the conversation has {len(conv) // 2} round(s)")
    history, _ = (
        _render_two_sep(tmpl, conv[: 2 * round_index]) if round_index else (tmpl.system + tmpl.sep, [])
    )
    user, assistant = tmpl.roles
    question = conv[2 * round_index]["value"]
    return f"{history}{user}: {question}{tmpl.sep}{assistant}:", conv[2 * round_index + 1]["value"]
