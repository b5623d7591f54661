"""RedPajama-style documents and ShareGPT-style chats of the tiny profile's shape world.

Seven subsets of documents (arXiv, books, C4, Common Crawl, GitHub, StackExchange, Wikipedia) filled
from template banks about shapes and colours, with a known number of exact duplicates and empty
documents, and text-only dialogues about the same world (``tasks.testkit.sample_tree`` writes them).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from typing import Any

from tasks.testkit.samples import (
    COUNT_WORDS,
    KINDS,
    PALETTE,
    POSITIONS,
    REDPAJAMA_SUBSETS,
    SampleConfig,
    SubsetCounts,
    part_rng,
    turns,
    with_articles,
)

_SIDES = {
    "circle": "no straight sides",
    "square": "four equal sides",
    "triangle": "three sides",
    "star": "ten edges",
}
_CORNERS = {"circle": "zero", "square": "four", "triangle": "three", "star": "ten"}
_DEFINITIONS = {
    "circle": "a round shape whose points are all the same distance from its centre",
    "square": "a shape with four equal sides and four right angles",
    "triangle": "a shape with three straight sides and three corners",
    "star": "a shape with five points around a centre",
}
_MIXES = {("red", "yellow"): "orange", ("blue", "yellow"): "green", ("red", "blue"): "purple"}
_OBJECT_COLOURS = {
    "banana": "yellow",
    "lemon": "yellow",
    "sky": "blue",
    "sea": "blue",
    "grass": "green",
    "leaf": "green",
    "tomato": "red",
    "strawberry": "red",
    "pumpkin": "orange",
    "carrot": "orange",
    "grape": "purple",
    "plum": "purple",
}
_OPPOSITES = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}

_BANKS: dict[str, tuple[str, ...]] = {
    "colour": tuple(PALETTE),
    "kind": KINDS,
    "position": POSITIONS,
    "object": tuple(_OBJECT_COLOURS),
    "name": (
        "Alice",
        "Bruno",
        "Clara",
        "Daniel",
        "Elena",
        "Farid",
        "Grace",
        "Hugo",
        "Irene",
        "Jonas",
        "Keiko",
        "Lena",
    ),
    "city": (
        "Amsterdam",
        "Bologna",
        "Cairo",
        "Denver",
        "Edinburgh",
        "Fukuoka",
        "Geneva",
        "Hanoi",
        "Lima",
        "Oslo",
    ),
    "country": ("Norway", "Italy", "Egypt", "Japan", "Peru", "Canada", "Kenya", "Chile", "Spain", "Vietnam"),
    "river": ("Avon", "Blue Creek", "Clearwater", "Danube", "Elbe", "Ganges", "Mekong", "Volta"),
    "profession": ("painter", "mathematician", "engineer", "botanist", "composer", "geographer", "architect"),
    "nationality": ("Norwegian", "Italian", "Egyptian", "Japanese", "Peruvian", "Canadian", "Kenyan"),
    "year": tuple(str(y) for y in range(1820, 2021, 7)),
    "n": tuple(str(n) for n in range(2, 98, 3)),
    "big": ("12,000", "85,000", "240,000", "1.2 million", "3.4 million", "640,000"),
    "adj": (
        "simple",
        "compact",
        "regular",
        "random",
        "sparse",
        "dense",
        "finite",
        "smooth",
        "convex",
        "stable",
    ),
    "mobject": (
        "graph",
        "matrix",
        "polygon",
        "manifold",
        "operator",
        "lattice",
        "sequence",
        "network",
        "tensor",
    ),
    "problem": ("the colouring problem", "the packing problem", "the counting problem", "shape recognition"),
    "quantity": ("error", "running time", "expected number of steps", "variance", "loss", "spectral gap"),
    "structure": ("decomposition", "embedding", "partition", "bound", "representation", "approximation"),
    "section": ("Introduction", "Related Work", "Method", "Experiments", "Results", "Conclusion"),
    "dataset": (
        "a synthetic shapes dataset",
        "small images of circles and squares",
        "a benchmark of triangles",
    ),
    "metric": ("accuracy", "recall", "precision", "perplexity", "throughput"),
    "place": ("garden", "kitchen", "station", "market", "library", "harbour", "forest", "school"),
    "time": ("morning", "evening", "night", "afternoon", "winter", "summer"),
    "mood": ("quiet", "cold", "bright", "grey", "warm", "windy", "still"),
    "verb": ("walked", "ran", "hurried", "wandered", "drove", "cycled"),
    "thing": ("kite", "door", "box", "hat", "boat", "lamp", "ball", "flag"),
    "product": ("notebook", "mug", "poster", "lamp", "backpack", "puzzle", "sticker set", "t-shirt"),
    "store": ("online shop", "craft store", "design studio", "toy store", "print shop"),
    "topic": ("geometry", "painting", "colour theory", "drawing", "design", "education", "puzzles"),
    "month": ("January", "March", "April", "June", "August", "October", "November"),
    "day": tuple(str(d) for d in range(1, 29, 3)),
    "company": ("Shapeworks", "Bright Colours Ltd", "Polygon Inc", "Circle & Co", "Triangle Labs"),
    "lang": ("Python", "JavaScript", "C", "Rust", "Go"),
    "task": (
        "draw a circle",
        "fill a polygon",
        "count the shapes in an image",
        "convert RGB to HSV",
        "read a JSON file",
        "sort a list of colours",
        "resize an image",
    ),
    "fname": (
        "area",
        "perimeter",
        "count_shapes",
        "mix_colours",
        "is_square",
        "centre_of",
        "scale",
        "rotate",
    ),
    "arg": ("shape", "radius", "side", "points", "image", "colour", "size", "value"),
}


def _fill(template: str, rng: random.Random) -> str:
    """Fill ``[[slot]]`` / ``[[slot2]]`` with bank entries (one value per name); ``[[Slot]]`` capitalises."""

    chosen: dict[str, str] = {}

    def pick(match: re.Match[str]) -> str:
        slot, digit = match.group(1), match.group(2)
        key = slot.lower() + digit
        if key not in chosen:
            bank = _BANKS[slot.lower()]
            taken = {v for k, v in chosen.items() if k.rstrip("0123456789") == slot.lower()}
            chosen[key] = rng.choice([v for v in bank if v not in taken] or bank)
        value = chosen[key]
        return value[0].upper() + value[1:] if slot[0].isupper() else value

    return with_articles(re.sub(r"\[\[([A-Za-z_]+?)(\d?)\]\]", pick, template))


def _fact_sentences(rng: random.Random) -> str:
    """One true sentence about the shapes-and-colours world."""
    kind = rng.choice(KINDS)
    obj = rng.choice(sorted(_OBJECT_COLOURS))
    (a, b), mixed = rng.choice(sorted(_MIXES.items()))
    pos = rng.choice(sorted(_OPPOSITES))
    return with_articles(
        rng.choice(
            (
                f"A {kind} is {_DEFINITIONS[kind]}.",
                f"A {kind} has {_SIDES[kind]}.",
                f"Mixing {a} and {b} gives {mixed}.",
                f"The colour of a ripe {obj} is usually {_OBJECT_COLOURS[obj]}.",
                f"The opposite of {pos} is {_OPPOSITES[pos]}.",
                f"A {kind} has {_CORNERS[kind]} corners.",
            )
        )
    )


_WIKI = (
    "[[City]] is a city in [[country]] with a population of about [[big]] people.",
    "The river [[river]] flows through [[city]] before it reaches the sea.",
    "[[Name]] was a [[nationality]] [[profession]] born in [[year]].",
    "[[Name]] is best known for paintings of [[colour]] [[kind]]s on plain backgrounds.",
    "In [[year]] the museum of [[city]] opened an exhibition about [[topic]].",
    "[[Colour]] is one of the colours most often used in flags of [[country]] and its neighbours.",
    "The [[object]] is often used as an example when children learn the names of colours.",
)
_ARXIV = (
    "We study [[problem]] for [[adj]] [[mobject]]s.",
    "Let $G$ be a [[adj]] [[mobject]] with $n$ vertices and $m$ edges.",
    "We prove that the [[quantity]] is bounded by $O(n^{[[n]]} \\log n)$.",
    "Our main theorem shows that every [[adj]] [[mobject]] admits a [[adj2]] [[structure]].",
    "Experiments on [[dataset]] show that the method improves [[metric]] by [[n]] percent.",
    "\\begin{equation} f(x) = \\sum_{i=1}^{n} \\frac{x_i^2}{[[n]]} \\end{equation}",
    "The proof relies on a [[structure]] of the [[mobject]] into [[n]] [[adj]] parts.",
    "As a corollary, the [[quantity]] of a random [[kind]] detector decays like $1/\\sqrt{n}$.",
)
_BOOK = (
    "[[Name]] [[verb]] to the [[place]] and looked at the [[colour]] [[thing]].",
    '"I have never seen a [[colour]] [[kind]] like that," said [[Name]].',
    "The [[time]] was [[mood]], and the [[place]] was empty.",
    "[[Name]] and [[Name2]] sat by the window of the [[place]] until the [[time]] ended.",
    "On the wall of the [[place]] hung a painting of a [[colour]] [[kind]].",
    '"Where did you put the [[thing]]?" asked [[Name]]. "On the [[position]]," said [[Name2]].',
)
_WEB = (
    "Welcome to our [[store]]! We offer [[n]] kinds of [[product]] at great prices.",
    "Click here to read more about [[topic]].",
    "Free shipping on all orders over [[n]] dollars.",
    "This [[product]] comes in [[colour]], [[colour2]] and [[colour3]].",
    "Posted by [[name]] on [[month]] [[day]], [[year]].",
    "Learn how to draw a [[colour]] [[kind]] in [[n]] easy steps.",
    "Sign up for our newsletter to get the latest [[topic]] news.",
    "Our [[store]] in [[city]] is open every day except Sunday.",
)
_CC_NOISE = (
    "Home | About | Contact | Shop",
    "Copyright [[year]] [[company]]. All rights reserved.",
    "We use cookies to improve your experience on our site.",
    "Share on Facebook | Share on Twitter",
)
_SE_QUESTIONS = (
    "How do I [[task]] in [[lang]]?",
    "What is the fastest way to [[task]] with [[lang]]?",
    "Why does my code fail when I try to [[task]]?",
    "How many corners does a [[kind]] have?",
)
_SE_ANSWERS = (
    "You can write a small function for that; the standard library already has most of what you need.",
    "Use a loop over the [[arg]] values and keep a running total.",
    "The error happens because [[arg]] is not defined before you use it.",
    "Check the documentation of [[lang]]; there is a built-in helper for this.",
    "I would split the problem into two steps: first compute the [[arg]], then draw the [[kind]].",
)
_CODE = (
    'def [[fname]]([[arg]]):\n    """Return the [[fname]] of a [[kind]]."""\n    return [[arg]] * [[n]]\n',
    "def [[fname]]([[arg]], [[arg2]]):\n    if [[arg]] > [[arg2]]:\n        return [[arg]]\n"
    "    return [[arg2]]\n",
    "function [[fname]]([[arg]]) {\n  return [[arg]].length * [[n]];\n}\n",
    "int [[fname]](int [[arg]]) {\n    return [[arg]] + [[n]];\n}\n",
    'COLOURS = ["[[colour]]", "[[colour2]]", "[[colour3]]"]\n',
    "for [[arg]] in range([[n]]):\n    print([[arg]])\n",
    "class [[Kind]]:\n    def __init__(self, [[arg]]):\n        self.[[arg]] = [[arg]]\n",
)
_LANG_BY_SNIPPET = ("Python", "Python", "JavaScript", "C", "Python", "Python", "Python")


def _paragraphs(rng: random.Random, sentence: Callable[[], str], max_paragraphs: int = 4) -> str:
    """1..max_paragraphs paragraphs of 2..7 sentences each."""
    return "\n\n".join(
        " ".join(sentence() for _ in range(rng.randint(2, 7))) for _ in range(rng.randint(1, max_paragraphs))
    )


def _mixed(rng: random.Random, templates: Sequence[str], fact_share: float) -> Callable[[], str]:
    """A sentence maker: a true world fact with probability ``fact_share``, else a filled template."""

    def sentence() -> str:
        return _fact_sentences(rng) if rng.random() < fact_share else _fill(rng.choice(templates), rng)

    return sentence


def _doc_arxiv(rng: random.Random, i: int) -> tuple[str, dict[str, Any]]:
    """A LaTeX-ish paper body."""
    sections = [
        f"\\section{{{s}}}\n" + _paragraphs(rng, _mixed(rng, _ARXIV, 0.1), 2) for s in _pick_sections(rng)
    ]
    yymm = f"{rng.randint(7, 23):02d}{rng.randint(1, 12):02d}"
    arxiv_id = f"{yymm}.{rng.randint(1000, 9999):04d}"
    meta = {"arxiv_id": arxiv_id, "language": "en", "url": f"https://arxiv.org/abs/{arxiv_id}", "yymm": yymm}
    return "\n\n".join(sections), meta


def _pick_sections(rng: random.Random) -> list[str]:
    """The first 1..4 section titles of a paper."""
    return list(_BANKS["section"][: rng.randint(1, 4)])


def _doc_book(rng: random.Random, i: int) -> tuple[str, dict[str, Any]]:
    """A chapter of a story."""
    title = f"The {_fill('[[Colour]] [[Kind]]', rng)} of {rng.choice(_BANKS['city'])}"
    text = f"CHAPTER {rng.choice(('I', 'II', 'III', 'IV', 'V'))}\n\n" + _paragraphs(
        rng, _mixed(rng, _BOOK, 0.1)
    )
    meta = {"publication_date": int(rng.choice(_BANKS["year"])), "short_book_title": title, "title": title}
    return text, meta


def _doc_web(rng: random.Random, noisy: bool) -> str:
    """A web page's text; ``noisy`` adds navigation and boilerplate lines."""
    text = _paragraphs(rng, _mixed(rng, _WEB, 0.25), 3)
    if noisy:
        text = _fill(rng.choice(_CC_NOISE), rng) + "\n" + text + "\n" + _fill(rng.choice(_CC_NOISE), rng)
    return text


def _doc_c4(rng: random.Random, i: int) -> tuple[str, dict[str, Any]]:
    """A C4 document."""
    meta = {"language": "en", "source": "c4", "url": f"https://www.example-{i % 17}.com/page/{i}"}
    return _doc_web(rng, noisy=False), meta


def _doc_common_crawl(rng: random.Random, i: int) -> tuple[str, dict[str, Any]]:
    """A CommonCrawl (CCNet) document."""
    meta = {
        "pred_label": "__label__wiki",
        "pred_label_prob": round(rng.uniform(0.5, 1.0), 3),
        "source": "cc/2023-06",
    }
    return _doc_web(rng, noisy=True), meta


def _doc_github(rng: random.Random, i: int) -> tuple[str, dict[str, Any]]:
    """A small source file."""
    which = [rng.randrange(len(_CODE)) for _ in range(rng.randint(1, 6))]
    text = "\n".join(_fill(_CODE[w], rng) for w in which)
    language = _LANG_BY_SNIPPET[which[0]]
    ext = {"Python": "py", "JavaScript": "js", "C": "c"}[language]
    meta = {
        "language": language,
        "license": rng.choice(("mit", "apache-2.0", "bsd-3-clause")),
        "path": f"src/{rng.choice(_BANKS['fname'])}_{i}.{ext}",
        "repo_name": f"{rng.choice(_BANKS['name']).lower()}/{rng.choice(_BANKS['kind'])}-tools",
        "source": "github",
    }
    return text, meta


def _doc_stackexchange(rng: random.Random, i: int) -> tuple[str, dict[str, Any]]:
    """A question with its answer, in RedPajama's ``Q:``/``A:`` layout."""
    question = _fill(rng.choice(_SE_QUESTIONS), rng)
    details = _paragraphs(rng, _mixed(rng, _WEB, 0.3), 1)
    answer = _paragraphs(rng, _mixed(rng, _SE_ANSWERS, 0.3), 2)
    meta = {"language": "en", "question_score": str(rng.randint(0, 40)), "source": "stackexchange"}
    meta["url"] = f"https://stackoverflow.com/questions/{100000 + i}"
    return f"Q:\n\n{question} {details}\n\nA:\n\n{answer}", meta


def _doc_wikipedia(rng: random.Random, i: int) -> tuple[str, dict[str, Any]]:
    """An encyclopedic article, mostly about the shapes-and-colours world."""
    title = rng.choice(KINDS + tuple(PALETTE) + _BANKS["city"]).capitalize()
    text = f"{title}\n\n" + _paragraphs(rng, _mixed(rng, _WIKI, 0.5))
    meta = {
        "language": "en",
        "title": title,
        "url": f"https://en.wikipedia.org/wiki/{title.replace(' ', '_')}",
    }
    return text, meta


_DOC_MAKERS: dict[str, Callable[[random.Random, int], tuple[str, dict[str, Any]]]] = {
    "arxiv": _doc_arxiv,
    "book": _doc_book,
    "c4": _doc_c4,
    "common_crawl": _doc_common_crawl,
    "github": _doc_github,
    "stackexchange": _doc_stackexchange,
    "wikipedia": _doc_wikipedia,
}


def make_subset(subset: str, config: SampleConfig) -> tuple[list[dict[str, Any]], SubsetCounts]:
    """The documents of one RedPajama subset: unique docs, then duplicates and empties at seeded places."""
    rng = part_rng(config, f"redpajama:{subset}")
    docs: list[dict[str, Any]] = []
    seen: set[str] = set()
    while len(docs) < config.n_docs_per_subset:
        text, meta = _DOC_MAKERS[subset](rng, len(docs))
        if text not in seen:
            seen.add(text)
            docs.append({"meta": meta, "text": text})
    for source in sorted(rng.sample(range(len(docs)), config.dup_docs_per_subset), reverse=True):
        docs.insert(rng.randint(source + 1, len(docs)), dict(docs[source]))
    blanks = ("", " \n\t ")
    offset = REDPAJAMA_SUBSETS.index(subset) if subset in REDPAJAMA_SUBSETS else 0
    for j in range(config.empty_docs_per_subset):
        docs.insert(rng.randint(0, len(docs)), {"meta": {"source": subset}, "text": blanks[(offset + j) % 2]})
    counts = SubsetCounts(
        docs=len(docs),
        unique=config.n_docs_per_subset,
        duplicates=config.dup_docs_per_subset,
        empty=config.empty_docs_per_subset,
        chars=sum(len(d["text"]) for d in docs),
    )
    return docs, counts


def _chat_pair(rng: random.Random) -> tuple[str, str]:
    """One text-only question with its answer about the shapes-and-colours world."""
    kind, kind2 = rng.choice(KINDS), rng.choice(KINDS)
    colour, colour2 = rng.choice(tuple(PALETTE)), rng.choice(tuple(PALETTE))
    obj = rng.choice(sorted(_OBJECT_COLOURS))
    (a, b), mixed = rng.choice(sorted(_MIXES.items()))
    pos = rng.choice(sorted(_OPPOSITES))
    x, y = rng.randint(0, 4), rng.randint(0, 4)
    pairs = (
        (f"How many corners does a {kind} have?", f"A {kind} has {_CORNERS[kind]} corners."),
        (f"What is a {kind}?", f"A {kind} is {_DEFINITIONS[kind]}."),
        (f"What colour do you get when you mix {a} and {b}?", f"Mixing {a} and {b} gives {mixed}."),
        (f"What colour is a {obj}?", f"A {obj} is usually {_OBJECT_COLOURS[obj]}."),
        (f"What is the opposite of {pos}?", f"The opposite of {pos} is {_OPPOSITES[pos]}."),
        (
            f"What is {COUNT_WORDS[x]} plus {COUNT_WORDS[y]}?",
            f"{COUNT_WORDS[x]} plus {COUNT_WORDS[y]} is {COUNT_WORDS[x + y]}.",
        ),
        (
            f"Describe a picture with a {colour} {kind} on the left and a {colour2} {kind2} on the right.",
            f"The picture shows a {colour} {kind} on the left and a {colour2} {kind2} on the right.",
        ),
        (
            f"Can you draw a {colour} {kind}?",
            f"I cannot draw, but a {colour} {kind} is {_DEFINITIONS[kind]}.",
        ),
    )
    question, answer = rng.choice(pairs)
    return with_articles(question), with_articles(answer)


def make_chats(config: SampleConfig) -> list[dict[str, Any]]:
    """ShareGPT style dialogues of 1..4 rounds."""
    rng = part_rng(config, "sharegpt")
    chats = []
    for i in range(config.n_chats):
        pairs = [_chat_pair(rng) for _ in range(rng.randint(1, 4))]
        if rng.random() < 0.2:
            pairs[0] = ("Hello! " + pairs[0][0], "Hello! " + pairs[0][1])
        chats.append({"conversations": turns(pairs, image=False), "id": f"sg_{i:05d}"})
    return chats
