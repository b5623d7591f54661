"""How the official scorers read a model's free-text answer.

Each rule here is the one the benchmark's own scorer applies, rewritten from the published
behaviour (VQA/EvalAI's answer processor for TextVQA, LLaVA's POPE and ScienceQA scripts, MME's
``calculation.py``, OpenCompass' MMBench rules): scores computed here are comparable with papers.
"""

from __future__ import annotations

import itertools
import re

# --- VQA / EvalAI answer processor (TextVQA) ------------------------------------------------------

_CONTRACTED = (  # noqa: SIM905 (one list of words, easier to read than a quoted list)
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't "
    "haven't he'd he'd've he's how'd how'll how's I'd've I'm I've isn't it'd it'd've it'll let's "
    "ma'am mightn't mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at "
    "shan't she'd've she's should've shouldn't shouldn't've somebody'd somebody'd've somebody'll "
    "somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll "
    "that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas "
    "wasn't we'd've we've weren't what'll what're what's what've when's where'd where's where've "
    "who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't wouldn't've "
    "y'all y'all'll y'all'd've you'd you'd've you'll you're you've"
).split()
"""Contractions the VQA processor restores; real words that a dropped apostrophe would make
(``its``, ``well``, ``were``, ``shed``, ``id``, ``hell``) are not in the list, as in the original."""


def _variants(word: str) -> list[str]:
    """The spellings of ``word`` with one or more of its apostrophes dropped."""
    parts = word.split("'")
    out = []
    for keep in itertools.product((True, False), repeat=len(parts) - 1):
        if all(keep):
            continue
        text = parts[0] + "".join(("'" if k else "") + p for k, p in zip(keep, parts[1:], strict=True))
        out.append(text)
    return out


CONTRACTIONS: dict[str, str] = {v: word for word in _CONTRACTED for v in _variants(word)}
"""Apostrophe-less spelling -> contraction (keys are matched after lowercasing, so the ones with a
capital ``I`` never match: the original processor behaves the same way)."""

_NUMBERS = "zero one two three four five six seven eight nine ten".split()  # noqa: SIM905
NUMBER_WORDS = {word: str(i) for i, word in enumerate(_NUMBERS)} | {"none": "0"}
"""Number words the processor turns into digits."""

ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                ",", "?", "!")  # fmt: skip
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")


def _punctuation(text: str) -> str:
    out = text
    for mark in _PUNCTUATION:
        if f"{mark} " in text or f" {mark}" in text or _DIGIT_COMMA.search(text):
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out)


def _digits_and_articles(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def vqa_normalise(answer: str) -> str:
    """An answer as the VQA/EvalAI processor sees it (lowercase; ``,`` ``?`` removed; punctuation,
    periods, articles, number words and contractions normalised)."""
    text = answer.lower().replace("\n", " ").replace("\t", " ").strip()
    text = text.replace(",", "").replace("?", "").replace("'s", " 's")
    return _digits_and_articles(_punctuation(text))


# --- yes / no -----------------------------------------------------------------------------------


def pope_yes_no(answer: str) -> str:
    """POPE's reading: the first sentence, commas removed; ``no`` when one of its words is exactly
    ``No``, ``no`` or ``not``, otherwise ``yes`` (an empty answer reads as ``yes``)."""
    first = answer.split(".")[0].replace(",", "")
    words = first.split(" ")
    return "no" if {"No", "no", "not"} & set(words) else "yes"


def mme_yes_no(answer: str) -> str:
    """MME's reading: ``yes``/``no`` when the lowercased answer is that word or its first four
    characters contain it (yes first), else ``other``, which is scored wrong."""
    text = answer.lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


# --- option letters --------------------------------------------------------------------------------

_SQA_SENTENCE = re.compile(r"The answer is ([A-Z]).")


def sqa_letter(answer: str, letters: str) -> str | None:
    """ScienceQA's reading: the answer itself when it is a letter, the letter of a leading ``X. ``,
    or the one letter in ``The answer is X.``; None (wrong) otherwise or when not among ``letters``."""
    if answer in letters and len(answer) == 1:
        letter = answer
    elif len(answer) >= 3 and answer[0] in letters and answer[1:3] == ". ":
        letter = answer[0]
    else:
        found = _SQA_SENTENCE.findall(answer)
        letter = found[0] if len(found) == 1 else None
    return letter if letter is not None and letter in letters else None


def mmbench_letter(answer: str, options: dict[str, str]) -> str | None:
    """MMBench's rule-based matching: a lone letter (``B``, ``B.``, ``(B)``, ``B: ...``, ``B. text``)
    among the options, else the one option whose text the answer equals or contains; None when the
    rules find no single option (OpenCompass would ask a GPT judge; offline this is wrong)."""
    text = answer.strip()
    if not text:
        return None
    lead = re.match(r"^\(?([A-Z])\)?(?:$|[.:,)\s])", text)
    if lead and lead.group(1) in options:
        return lead.group(1)
    low = text.lower().rstrip(".")
    exact = [k for k, v in options.items() if v.strip().lower().rstrip(".") == low]
    if len(exact) == 1:
        return exact[0]
    contained = [
        k for k, v in options.items() if v.strip() and re.search(rf"\b{re.escape(v.strip().lower())}\b", low)
    ]
    return contained[0] if len(contained) == 1 else None


def gqa_normalise(answer: str) -> str:
    """GQA's comparison form: LLaVA's conversion strips spaces and a trailing period and lowercases."""
    return answer.strip().rstrip(".").lower()
