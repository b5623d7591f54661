"""The hostile-input corpus of the hardening issue: real source files for every builder kind, and the
table of what must happen to each case.

``cases()`` is the table; ``write_corpus(root)`` writes the sources, the images and one spec per
dataset (``root/specs/NAME.yaml``) under ``root``, used as the data root, and returns the table. The
text spec names the tokenizer folder ``root/tok``, which the caller saves there.

A case's ``fate`` is ``"kept"`` (the sample is in the shards with ``expect`` as its content),
``("rejected", reason)`` (``rejects.jsonl`` of the build of ``dataset`` has ``reason`` at ``where``)
or ``("build_error", text)`` (building ``dataset`` fails with a message containing ``text`` and the
file's name). ``docs/untrusted-inputs.md`` carries ``markdown_table(cases())``; a test keeps it in sync.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

KEPT = "kept"
Fate = str | tuple[str, str]
ABSOLUTE = "<absolute path of outside/secret.jpg>"
"""Stands for the real absolute path, which is known only when the corpus is written."""
LOCAL = "{LOCAL_SERVER}"


@dataclass(frozen=True)
class Case:
    """One hostile input and what must happen to it."""

    id: str
    """Unique case id (the test id)."""
    kind: str
    """Builder kind: ``text``, ``chat``, ``instruct`` or ``image_text``."""
    dataset: str
    """The spec whose build holds the case."""
    what: str
    """What the input is, for people."""
    fate: Fate
    """``"kept"``, ``("rejected", reason)`` or ``("build_error", text)``."""
    where: str = ""
    """Where the case is in its source, as ``rejects.jsonl`` writes it (``line 3``, ``record 5``, ...)."""
    expect: Any = None
    """Kept cases: the content the shards must hold (text, conversations or caption, image colour)."""
    payload: Any = field(default=None, repr=False, compare=False)
    """The raw input (line bytes, record, entry); written by ``write_corpus``."""
    known_bug: str = ""
    """Set when the code does not give this fate yet: the test is a strict xfail naming the bug."""


def rejected(reason: str) -> Fate:
    """The fate of a case rejected with ``reason``."""
    return ("rejected", reason)


def build_error(text: str) -> Fate:
    """The fate of a case whose build fails with a message containing ``text``."""
    return ("build_error", text)


# --- specs ---------------------------------------------------------------------------------------

SPECS = {
    "hc-text": """\
kind: text
tokenizer: tok
seq_len: 16
shard_samples: 64
filters: {min_chars: 5, max_chars: 2000}
subsets:
  - {name: web, source: {type: files, paths: [raw/text.jsonl]}}
""",
    "hc-chat": """\
kind: chat
filters: {max_chars: 1000}
subsets:
  - {name: main, source: {type: llava_json, path: raw/chat.json}}
""",
    "hc-instruct": """\
kind: instruct
image_size: 64
filters: {max_chars: 1000, max_image_pixels: 1000000}
subsets:
  - {name: main, source: {type: llava_json, path: raw/instruct.json, image_root: img}}
""",
    "hc-pretrain": """\
kind: image_text
image_size: 32
filters: {max_caption_chars: 200, max_image_pixels: 1000000}
subsets:
  - {name: main, source: {type: llava_json, path: raw/pretrain.json, image_root: img}}
""",
    "hc-urls": """\
kind: image_text
image_size: 32
shard_samples: 100
allow_hosts: [127.0.0.1]
filters: {max_caption_chars: 200, max_image_pixels: 1000000}
subsets:
  - {name: web, source: {type: url_list, path: lists/urls.tsv, local_server: {root: img}}}
""",
    "hc-instruct-symlink-loop": """\
kind: instruct
image_size: 64
subsets:
  - {name: main, source: {type: llava_json, path: raw/instruct-loop.json, image_root: img-loop}}
""",
    "hc-text-json-object": """\
kind: text
tokenizer: tok
seq_len: 16
subsets:
  - {name: web, source: {type: files, format: json, paths: [raw/text-object.json]}}
""",
    "hc-chat-oversized-file": """\
kind: chat
filters: {max_json_bytes: 1024}
subsets:
  - {name: main, source: {type: llava_json, path: raw/chat-big.json}}
""",
    "hc-pretrain-oversized-file": """\
kind: image_text
image_size: 32
filters: {max_json_bytes: 1024}
subsets:
  - {name: main, source: {type: llava_json, path: raw/pretrain-big.json, image_root: img}}
""",
    "hc-chat-raw-nul": """\
kind: chat
subsets:
  - {name: main, source: {type: llava_json, path: raw/chat-nul.json}}
""",
    "hc-instruct-deep-nesting": """\
kind: instruct
image_size: 64
subsets:
  - {name: main, source: {type: llava_json, path: raw/instruct-deep.json, image_root: img}}
""",
}
SOURCES = {
    "hc-text": "raw/text.jsonl",
    "hc-chat": "raw/chat.json",
    "hc-instruct": "raw/instruct.json",
    "hc-pretrain": "raw/pretrain.json",
    "hc-urls": "lists/urls.tsv",
    "hc-instruct-symlink-loop": "raw/instruct-loop.json",
    "hc-text-json-object": "raw/text-object.json",
    "hc-chat-oversized-file": "raw/chat-big.json",
    "hc-pretrain-oversized-file": "raw/pretrain-big.json",
    "hc-chat-raw-nul": "raw/chat-nul.json",
    "hc-instruct-deep-nesting": "raw/instruct-deep.json",
}
"""The source file of each dataset (relative to the data root)."""


def spec_text(name: str) -> str:
    """The YAML of a corpus spec (every spec keeps all rejects: ``max_failure_ratio: 1.0``)."""
    return f"name: {name}\nprofile: tiny\nlicense: CC0-1.0\nmax_failure_ratio: 1.0\n{SPECS[name]}"


# --- text (jsonl) --------------------------------------------------------------------------------


def _doc(i: int) -> str:
    return f"Document {i} says a red circle sits left of a blue square."


def _jl(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def _text_cases() -> list[Case]:
    rows: list[tuple[str, str, Fate, bytes, str | None]] = [
        ("bom_first_line", "UTF-8 BOM before the first record", KEPT,
         b"\xef\xbb\xbf" + _jl({"text": _doc(0)}),
         _doc(0)),
        ("crlf_line_end", "record ending in CRLF", KEPT, _jl({"text": _doc(1)}) + b"\r", _doc(1)),
        ("crlf_in_text", "CRLF inside the text", KEPT, _jl({"text": "Windows\r\nline ends inside."}),
         "Windows\nline ends inside."),
        ("nul_escaped", "NUL as a JSON escape in the text", KEPT, _jl({"text": "NUL \u0000 escaped here"}),
         "NUL  escaped here"),
        ("nul_raw_byte", "raw NUL byte inside the JSON string", rejected("invalid_json"),
         b'{"text": "raw NUL \x00 byte"}', None),
        ("invalid_utf8", "bytes that are not UTF-8", rejected("invalid_utf8"),
         b'{"text": "bad \xff\xfe bytes"}',
         None),
        ("malformed_json", "unterminated JSON", rejected("invalid_json"), b'{"text": "unterminated', None),
        ("not_an_object", "a JSON list instead of an object", rejected("not_an_object"), _jl(["a", "list"]),
         None),
        ("missing_field", "no text field", rejected("missing_field"), _jl({"body": "no text field"}), None),
        ("wrong_type", "text is a number", rejected("bad_type"), _jl({"text": 42}), None),
        ("only_controls", "only whitespace and control characters", rejected("empty"),
         _jl({"text": " \t\u0001\u0007 "}), None),
        ("too_short", "3 characters < min_chars 5", rejected("too_short"), _jl({"text": "abc"}), None),
        ("too_long", "3000 characters > max_chars 2000 (line within the byte bound)", rejected("too_long"),
         _jl({"text": "x" * 3000}), None),
        ("document_5mb", "a 5 MB document (line over the 1.05 MB bound from max_chars)",
         rejected("oversized_line"), _jl({"text": "y" * (5 << 20)}), None),
        ("oversized_garbage", "a 2 MB line that is not JSON", rejected("oversized_line"), b"z" * (2 << 20),
         None),
        ("bom_mid_file", "UTF-8 BOM at the start of a later line (concatenated files)",
         rejected("invalid_json"), b"\xef\xbb\xbf" + _jl({"text": _doc(2)}), None),
        ("lone_surrogate", "lone surrogate escape \\ud800 (not encodable as UTF-8)",
         rejected("invalid_unicode"),
         b'{"text": "a lone \\ud800 surrogate here"}', None),
        ("deep_nesting", "JSON nested 100,000 levels deep", rejected("invalid_json"), b"[" * 100_000, None),
        ("huge_integer", "an integer of 5000 digits", rejected("invalid_json"),
         b'{"text": "ok text", "n": ' + b"9" * 5000 + b"}", None),
        ("duplicate_document", "same text as an earlier record", rejected("duplicate"),
         _jl({"text": _doc(1)}),
         None),
        ("long_last_document", "a long document (the tail tokens that do not fill a sequence are dropped)",
         KEPT, _jl({"text": " ".join(_doc(i) for i in range(3, 9))}), " ".join(_doc(i) for i in range(3, 9))),
        ("truncated_last_line", "file ends mid-record, no newline", rejected("invalid_json"),
         b'{"text": "cut off in the mid', None),
    ]  # fmt: skip
    cases = []
    for number, (ident, what, fate, line, expect) in enumerate(rows, start=1):
        cases.append(Case(ident, "text", "hc-text", what, fate, f"line {number}", expect, line))
    return cases


def _write_text(root: Path, cases: list[Case]) -> None:
    lines = [c.payload for c in cases if c.dataset == "hc-text"]
    body = b"\n".join(lines[:-1]) + b"\n" + lines[-1]  # the last line has no newline
    _write(root / SOURCES["hc-text"], body)


# --- chat and instruct (LLaVA json) --------------------------------------------------------------


def _conv(*values: str) -> list[dict[str, str]]:
    """Alternating human/gpt turns with the given values."""
    return [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(values)]


GOOD_CHAT = _conv("Hello!", "Hi.", "How many sides has a square?", "Four.")


def _chat_cases() -> list[Case]:
    crlf = _conv("Line one\r\nline two?", "Yes.\r\n")
    rows: list[tuple[str, str, Fate, Any]] = [
        ("chat_good", "a good multi-turn conversation", KEPT, {"id": "c1", "conversations": GOOD_CHAT}),
        ("chat_crlf_in_turns", "CRLF inside turns (kept verbatim)", KEPT,
         {"id": "c2", "conversations": crlf}),
        ("chat_no_id", "no id (the sample key stands in)", KEPT,
         {"conversations": _conv("Anonymous?", "Yes.")}),
        ("chat_with_image", "an image in a text-only dataset", rejected("unexpected_image"),
         {"id": "c3", "image": "good.jpg", "conversations": _conv("<image>\nWhat?", "A box.")}),
        ("chat_image_placeholder", "<image> in a sample without an image", rejected("image_placeholder"),
         {"id": "c4", "conversations": _conv("<image>\nHi", "Hello")}),
        ("chat_gpt_first", "wrong roles: gpt speaks first", rejected("bad_conversation"),
         {"id": "c5", "conversations": [{"from": "gpt", "value": "Hi"}, {"from": "human", "value": "Yo"}]}),
        ("chat_two_humans", "wrong roles: two human turns in a row", rejected("bad_conversation"),
         {"id": "c6", "conversations": [{"from": "human", "value": "A"}, {"from": "human", "value": "B"}]}),
        ("chat_system_role", "unknown role 'system'", rejected("bad_conversation"),
         {"id": "c7", "conversations": [{"from": "system", "value": "Be nice"}, *_conv("Hi", "Hello")]}),
        ("chat_value_not_string", "turn value is a number", rejected("bad_conversation"),
         {"id": "c8", "conversations": [{"from": "human", "value": 1}, {"from": "gpt", "value": "2"}]}),
        ("chat_nul_in_turn", "NUL character in a turn", rejected("control_characters"),
         {"id": "c9", "conversations": _conv("Hi\u0000there", "Hello")}),
        ("chat_lone_surrogate", "lone surrogate \\ud800 in a turn", rejected("invalid_unicode"),
         {"id": "c10", "conversations": _conv("Hi \ud800", "Hello")}),
        ("chat_duplicate_id", "id of an earlier record", rejected("duplicate_id"),
         {"id": "c1", "conversations": _conv("Again?", "Yes.")}),
        ("chat_turn_100kb", "a 100 KB turn (> max_chars 1000)", rejected("too_long"),
         {"id": "c11", "conversations": _conv("Tell me.", "w" * 100_000)}),
        ("chat_turn_5mb", "a 5 MB turn (> max_chars 1000; the file is under max_json_bytes)",
         rejected("too_long"), {"id": "c12", "conversations": _conv("v" * (5 << 20), "Ok.")}),
        ("chat_record_string", "a record that is a string", rejected("invalid_record"), "just a string"),
    ]  # fmt: skip
    return [_record_case("chat", "hc-chat", i, row) for i, row in enumerate(rows)]


def _img(image: Any, ident: str, conv: Any = None) -> dict[str, Any]:
    return {"id": ident, "image": image, "conversations": conv or _conv("<image>\nWhat is it?", "A shape.")}


GOOD_INSTRUCT = _conv("<image>\nWhat colour is the shape?", "Red.", "And its form?", "A rectangle.")
RED, BLUE, GREY16 = (200, 30, 30), (40, 70, 225), (156, 156, 156)
"""Colours of the kept images (GREY16: 40000/65535 of full scale, not clipped to white)."""


def _instruct_cases() -> list[Case]:
    rows: list[tuple[str, str, Fate, Any, Any]] = [
        ("good_image", "a good image sample", KEPT, _img("good.jpg", "good", GOOD_INSTRUCT), RED),
        ("text_only", "a text-only sample", KEPT,
         {"id": "text", "conversations": _conv("Name a colour.", "Blue.")},
         None),
        ("cmyk_jpeg", "CMYK JPEG (converted to RGB)", KEPT, _img("cmyk.jpg", "cmyk"), (255, 0, 0)),
        ("grey_16bit_png", "16-bit greyscale PNG (scaled to 8 bits)", KEPT, _img("grey16.png", "grey16"),
         GREY16),
        ("animated_gif", "animated GIF (first frame)", KEPT, _img("anim.gif", "anim"), (0, 0, 255)),
        ("symlink_inside_root", "symlink to an image inside the root", KEPT,
         _img("inside_link.jpg", "link"), RED),
        ("nested_path", "image in a sub-folder", KEPT, _img("sub/dir/nested.jpg", "nested"), BLUE),
        ("truncated_image", "JPEG cut in half", rejected("decode_error"), _img("truncated.jpg", "b1"), None),
        ("zero_byte_image", "zero-byte file", rejected("decode_error"), _img("zero.jpg", "b2"), None),
        ("not_an_image", "text bytes named .jpg", rejected("decode_error"), _img("text.jpg", "b3"), None),
        ("decompression_bomb", "36 Mpx PNG of a few KB (> 2 x max_image_pixels)", rejected("image_too_large"),
         _img("bomb.png", "l1"), None),
        ("over_max_pixels", "1.2 Mpx > max_image_pixels 1 Mpx", rejected("image_too_large"),
         _img("large.png", "l2"), None),
        ("aspect_wide", "420x20 (21:1 > max_aspect_ratio 20)", rejected("bad_aspect_ratio"),
         _img("wide.png", "a1"), None),
        ("aspect_tall", "10x300 (1:30)", rejected("bad_aspect_ratio"), _img("tall.png", "a2"), None),
        ("too_small", "6x40 < min_image_side 8", rejected("image_too_small"), _img("tiny.png", "s1"), None),
        ("absolute_path", "absolute image path", rejected("path_outside_root"), _img(ABSOLUTE, "x1"), None),
        ("dotdot_path", "'..' leaving the root", rejected("path_outside_root"),
         _img("../outside/secret.jpg", "x2"), None),
        ("dotdot_inside_path", "'..' after a sub-folder", rejected("path_outside_root"),
         _img("sub/../../outside/secret.jpg", "x3"), None),
        ("symlink_escape", "symlink inside the root pointing outside it", rejected("path_outside_root"),
         _img("escape.jpg", "x4"), None),
        ("nul_in_path", "NUL in the image path", rejected("bad_image_field"),
         _img("good.jpg\u0000.png", "x6"),
         None),
        ("path_too_long", "a 5000-character image name", rejected("missing_image"), _img("n" * 5000, "x7"),
         None),
        ("url_as_image", "a metadata URL as the image field (read as a relative path, never fetched)",
         rejected("missing_image"), _img("http://169.254.169.254/latest/meta-data/x.jpg", "x8"), None),
        ("missing_file", "image file does not exist", rejected("missing_image"), _img("nope.jpg", "m1"),
         None),
        ("directory_as_image", "image path is a folder", rejected("missing_image"), _img("sub", "m2"), None),
        ("repeated_image_token", "<image> twice in the first turn", rejected("image_placeholder"),
         _img("good.jpg", "p1", _conv("<image>\n<image>\nHi", "Hello")), None),
        ("image_token_later_turn", "<image> in a later human turn", rejected("image_placeholder"),
         _img("good.jpg", "p2", _conv("Hi", "Hello", "<image>\nAnd?", "No.")), None),
        ("image_without_token", "an image but no <image>", rejected("image_placeholder"),
         _img("good.jpg", "p3", _conv("What is it?", "A shape.")), None),
        ("wrong_roles", "wrong roles: gpt first", rejected("bad_conversation"),
         _img("good.jpg", "r1", [{"from": "gpt", "value": "<image>\nHi"}, {"from": "human", "value": "?"}]),
         None),
        ("duplicate_id", "id of an earlier record", rejected("duplicate_id"),
         {"id": "good", "conversations": _conv("Second good?", "No.")}, None),
        ("turn_100kb", "a 100 KB turn (> max_chars 1000)", rejected("too_long"),
         {"id": "t1", "conversations": _conv("Hi", "u" * 100_000)}, None),
    ]  # fmt: skip
    return [_record_case("instruct", "hc-instruct", i, row[:4], row[4]) for i, row in enumerate(rows)]


def _record_case(kind: str, dataset: str, index: int, row: tuple, colour: Any = None) -> Case:
    ident, what, fate, record = row
    expect = None
    if fate == KEPT:
        expect = {"conversations": record["conversations"], "image": "image" in record, "colour": colour}
    return Case(ident, kind, dataset, what, fate, f"record {index}", expect, record)


def _write_records(root: Path, dataset: str, cases: list[Case]) -> None:
    records = [_absolute(c.payload, root) for c in cases if c.dataset == dataset]
    text = json.dumps(records, indent=1)  # ASCII: a lone surrogate stays a \ud800 escape, as JSON allows
    _write(root / SOURCES[dataset], b"\xef\xbb\xbf" + text.encode())  # a UTF-8 BOM, as Windows tools write


def _absolute(record: Any, root: Path) -> Any:
    if isinstance(record, dict) and record.get("image") == ABSOLUTE:
        return {**record, "image": str(root / "outside" / "secret.jpg")}
    return record


# --- image_text: LLaVA pretrain json -------------------------------------------------------------


def _entry(ident: str, image: Any, caption: str | None = "A red rectangle.") -> dict[str, Any]:
    turns = [{"from": "human", "value": "<image>\nDescribe the image."}]
    if caption is not None:
        turns.append({"from": "gpt", "value": caption})
    return {"id": ident, "image": image, "conversations": turns}


def _pretrain_cases() -> list[Case]:
    rows: list[tuple[str, str, Fate, Any, Any]] = [
        ("pt_good", "a good entry", KEPT, _entry("good", "good.jpg"), ("A red rectangle.", RED)),
        ("pt_caption_controls", "caption with NUL, ESC, CRLF and tabs (normalised)", KEPT,
         _entry("ctrl", "good.jpg", "A red\u0000 rectangle\r\n\ton a\u001b white page."),
         ("A red rectangle on a white page.", RED)),
        ("pt_cmyk", "CMYK JPEG", KEPT, _entry("cmyk", "cmyk.jpg"), ("A red rectangle.", (255, 0, 0))),
        ("pt_grey_16bit", "16-bit greyscale PNG (scaled, was clipped to white)", KEPT,
         _entry("grey16", "grey16.png"), ("A red rectangle.", GREY16)),
        ("pt_animated", "animated GIF (first frame)", KEPT, _entry("anim", "anim.gif"),
         ("A red rectangle.", (0, 0, 255))),
        ("pt_symlink_inside_root", "symlink to an image inside the root", KEPT,
         _entry("link", "inside_link.jpg"), ("A red rectangle.", RED)),
        ("pt_truncated", "JPEG cut in half", rejected("decode_error"), _entry("b1", "truncated.jpg"), None),
        ("pt_zero_byte", "zero-byte file", rejected("decode_error"), _entry("b2", "zero.jpg"), None),
        ("pt_not_an_image", "text bytes named .jpg", rejected("decode_error"), _entry("b3", "text.jpg"),
         None),
        ("pt_bomb", "36 Mpx PNG of a few KB", rejected("image_too_large"), _entry("l1", "bomb.png"), None),
        ("pt_over_max_pixels", "1.2 Mpx > max_image_pixels", rejected("image_too_large"),
         _entry("l2", "large.png"), None),
        ("pt_aspect_wide", "21:1", rejected("bad_aspect_ratio"), _entry("a1", "wide.png"), None),
        ("pt_aspect_tall", "1:30", rejected("bad_aspect_ratio"), _entry("a2", "tall.png"), None),
        ("pt_too_small", "6x40", rejected("image_too_small"), _entry("s1", "tiny.png"), None),
        ("pt_absolute_path", "absolute image path", rejected("path_outside_root"), _entry("x1", ABSOLUTE),
         None),
        ("pt_dotdot_path", "'..' leaving the root", rejected("path_outside_root"),
         _entry("x2", "../outside/secret.jpg"), None),
        ("pt_symlink_escape", "symlink pointing outside the root", rejected("path_outside_root"),
         _entry("x3", "escape.jpg"), None),
        ("pt_nul_in_path", "NUL in the image path", rejected("path_outside_root"),
         _entry("x4", "good.jpg\u0000.png"), None),
        ("pt_path_too_long", "a 5000-character image name", rejected("missing_image"),
         _entry("x6", "n" * 5000),
         None),
        ("pt_missing_file", "image file does not exist", rejected("missing_image"), _entry("m1", "nope.jpg"),
         None),
        ("pt_duplicate_id", "id of an earlier entry", rejected("duplicate"), _entry("good", "cmyk.jpg"),
         None),
        ("pt_no_caption", "no gpt turn", rejected("missing_caption"), _entry("c1", "good.jpg", None), None),
        ("pt_empty_caption", "caption of spaces", rejected("empty_caption"), _entry("c2", "good.jpg", "   "),
         None),
        ("pt_caption_100kb", "a 100 KB caption (> max_caption_chars 200)", rejected("caption_too_long"),
         _entry("c3", "good.jpg", "word " * 20_000), None),
        ("pt_lone_surrogate", "lone surrogate \\ud800 in the caption", rejected("invalid_unicode"),
         _entry("c4", "good.jpg", "A red \ud800 rectangle."), None),
        ("pt_no_image_field", "no image field", rejected("invalid_entry"),
         {"id": "e1", "conversations": _entry("e1", "x")["conversations"]}, None),
        ("pt_not_an_object", "an entry that is a list", rejected("invalid_entry"), ["not", "an", "object"],
         None),
    ]  # fmt: skip
    cases = []
    for i, (ident, what, fate, entry, expect) in enumerate(rows):
        if expect is not None:
            expect = {"key": f"main-{entry['id']}", "caption": expect[0], "colour": expect[1]}
        cases.append(Case(ident, "image_text", "hc-pretrain", what, fate, f"entry {i}", expect, entry))
    return cases


# --- image_text: URL list (TSV) through img2dataset -----------------------------------------------


def _url_cases() -> list[Case]:
    ok = "a picture of a shape"
    rows: list[tuple[str, str, Fate, bytes, Any]] = [
        ("url_good", "a good URL on the loopback server", KEPT,
         f"{LOCAL}/good.jpg\tA red rectangle.".encode(),
         ("A red rectangle.", RED)),
        ("url_crlf_row", "a row ending in CRLF", KEPT,
         f"{LOCAL}/sub/dir/nested.jpg\tA blue square.\r".encode(),
         ("A blue square.", BLUE)),
        ("url_caption_nul", "caption with NUL and ESC (removed)", KEPT,
         f"{LOCAL}/cmyk.jpg\tA red\x00 box\x1b here.".encode(), ("A red box here.", (255, 0, 0))),
        ("url_http_404", "the server answers 404", rejected("http_404"), f"{LOCAL}/nope.jpg\t{ok}".encode(),
         None),
        ("url_not_an_image", "the server sends text bytes", rejected("decode_error"),
         f"{LOCAL}/text.jpg\t{ok}".encode(), None),
        ("url_too_small", "a 6x40 image", rejected("image_too_small"), f"{LOCAL}/tiny.png\t{ok}".encode(),
         None),
        ("url_aspect", "a 21:1 image", rejected("bad_aspect_ratio"), f"{LOCAL}/wide.png\t{ok}".encode(),
         None),
        ("url_decompression_bomb", "a 36 Mpx PNG of a few KB (refused from its header, never decoded)",
         rejected("image_too_large"), f"{LOCAL}/bomb.png\t{ok}".encode(),
         "6000x6000 > max_image_pixels 1000000"),
        ("url_over_max_pixels", "1.2 Mpx > max_image_pixels 1 Mpx", rejected("image_too_large"),
         f"{LOCAL}/large.png\t{ok}".encode(), None),
        ("url_file_scheme", "file: URL", rejected("url_refused"), b"file:///etc/passwd\tx y",
         "scheme 'file'"),
        ("url_ftp_scheme", "ftp: URL", rejected("url_refused"), b"ftp://example.com/a.jpg\tx y",
         "scheme 'ftp'"),
        ("url_javascript", "javascript: URL", rejected("url_refused"), b"javascript:alert(1)\tx y",
         "scheme 'javascript'"),
        ("url_data", "data: URL", rejected("url_refused"), b"data:image/png;base64,iVBORw0KGgo=\tx y",
         "scheme 'data'"),
        ("url_empty_scheme", "scheme-relative //host/path", rejected("url_refused"),
         b"//example.com/a.jpg\tx y", "scheme '(none)'"),
        ("url_no_scheme", "host/path without a scheme", rejected("url_refused"), b"example.com/a.jpg\tx y",
         "scheme '(none)'"),
        ("url_localhost", "localhost", rejected("url_refused"), b"http://localhost/a.jpg\tx y",
         "loopback name"),
        ("url_fullwidth_localhost", "fullwidth 'localhost' (IDNA maps it to localhost)",
         rejected("url_refused"),
         "http://ｌｏｃａｌｈｏｓｔ/a.jpg\tx y".encode(), "loopback name"),
        ("url_loopback_other", "127.0.0.2 (only 127.0.0.1 is allowed)", rejected("url_refused"),
         b"http://127.0.0.2/a.jpg\tx y", "loopback address"),
        ("url_loopback_hex", "0x7f000002 (hex form of 127.0.0.2)", rejected("url_refused"),
         b"http://0x7f000002/a.jpg\tx y", "loopback address"),
        ("url_ipv6_loopback", "[::1]", rejected("url_refused"), b"http://[::1]/a.jpg\tx y",
         "loopback address"),
        ("url_ipv6_mapped", "[::ffff:10.0.0.1] (IPv4-mapped private)", rejected("url_refused"),
         b"http://[::ffff:10.0.0.1]/a.jpg\tx y", "private address"),
        ("url_unspecified", "0.0.0.0", rejected("url_refused"), b"http://0.0.0.0/a.jpg\tx y", "unspecified"),
        ("url_private_10", "10.0.0.5", rejected("url_refused"), b"http://10.0.0.5/a.jpg\tx y",
         "private address"),
        ("url_private_172", "172.16.3.4", rejected("url_refused"), b"http://172.16.3.4/a.jpg\tx y",
         "private address"),
        ("url_private_192", "192.168.1.10", rejected("url_refused"), b"http://192.168.1.10/a.jpg\tx y",
         "private address"),
        ("url_private_decimal", "167772161 (decimal form of 10.0.0.1)", rejected("url_refused"),
         b"http://167772161/a.jpg\tx y", "private address"),
        ("url_ipv6_ula", "[fd00::1] (unique local)", rejected("url_refused"), b"http://[fd00::1]/a.jpg\tx y",
         "private address"),
        ("url_link_local", "169.254.10.10", rejected("url_refused"), b"http://169.254.10.10/a.jpg\tx y",
         "link-local"),
        ("url_cloud_metadata", "169.254.169.254 (cloud metadata)", rejected("url_refused"),
         b"http://169.254.169.254/latest/meta-data/\tx y", "link-local"),
        ("url_ipv6_link_local", "[fe80::1]", rejected("url_refused"), b"http://[fe80::1]/a.jpg\tx y",
         "link-local"),
        ("url_metadata_name", "metadata.google.internal", rejected("url_refused"),
         b"http://metadata.google.internal/computeMetadata/v1/\tx y", "cloud metadata name"),
        ("url_credentials", "user:password@ in the URL", rejected("url_refused"),
         b"http://user:secret@example.com/a.jpg\tx y", "credentials"),
        ("url_whitespace", "a space in the host", rejected("url_refused"), b"http://exa mple.com/a.jpg\tx y",
         "whitespace or control"),
        ("url_nul", "NUL byte in the URL", rejected("url_refused"), b"http://example.com/\x00a.jpg\tx y",
         "whitespace or control"),
        ("url_empty", "empty URL", rejected("url_refused"), b"\tx y", "empty URL"),
        ("url_malformed", "unclosed IPv6 bracket", rejected("url_refused"), b"http://[::1/a.jpg\tx y",
         "malformed URL"),
        ("url_duplicate", "the same URL again", rejected("duplicate"), f"{LOCAL}/good.jpg\tagain".encode(),
         None),
        ("url_empty_caption", "caption of spaces", rejected("empty_caption"),
         f"{LOCAL}/good.jpg?e\t   ".encode(),
         None),
        ("url_caption_100kb", "a 100 KB caption (> max_caption_chars 200)", rejected("caption_too_long"),
         f"{LOCAL}/good.jpg?c\t".encode() + b"word " * 20_000, None),
        ("url_invalid_utf8", "bytes that are not UTF-8", rejected("invalid_utf8"),
         f"{LOCAL}/good.jpg?u\tbad ".encode() + b"\xff\xfe", None),
        ("url_three_fields", "three fields instead of two", rejected("invalid_row"), b"a\tb\tc", None),
        ("url_oversized_line", "a 2 MB row (over the 1.05 MB bound from max_caption_chars)",
         rejected("oversized_line"), f"{LOCAL}/good.jpg?o\t".encode() + b"long " * (400 << 10), None),
    ]  # fmt: skip
    cases = []
    parsed = 0
    for number, (ident, what, fate, line, expect) in enumerate(rows, start=2):  # line 1 is the header
        reason = fate[1] if isinstance(fate, tuple) else None
        if reason in ("invalid_utf8", "invalid_row", "oversized_line"):
            where = f"line {number}"
        else:
            where = f"row {parsed}"
            parsed += 1
        if fate == KEPT:
            expect = {"row": parsed - 1, "caption": expect[0], "colour": expect[1]}
        elif expect is not None:
            expect = {"detail": expect}
        cases.append(Case(ident, "image_text", "hc-urls", what, fate, where, expect, line))
    return cases


def _write_urls(root: Path, cases: list[Case]) -> None:
    lines = [b"\xef\xbb\xbfurl\tcaption\r"] + [c.payload for c in cases if c.dataset == "hc-urls"]
    _write(root / SOURCES["hc-urls"], b"\n".join(lines) + b"\n\n")  # a blank line at the end: not a row


def _loop_cases() -> list[Case]:
    """A symlink loop in the image root: its samples are rejected, the rest of the build is unharmed
    (the image-root fingerprint does not follow a link that leads nowhere)."""
    rows = [
        ("loop_root_good_image", "a good image beside a symlink loop", KEPT, _img("good.jpg", "good"), RED),
        ("symlink_loop", "symlink loop in the image root", rejected("missing_image"),
         _img("loop_a.jpg", "x5"), None),
    ]  # fmt: skip
    return [
        _record_case("instruct", "hc-instruct-symlink-loop", i, tuple(row), colour)
        for i, (*row, colour) in enumerate(rows)
    ]


# --- whole-file errors ---------------------------------------------------------------------------


def _file_cases() -> list[Case]:
    return [
        Case("text_json_not_a_list", "text", "hc-text-json-object",
            "a json source that is an object, not a list",
             build_error("expected a JSON list of records"), payload=_jl({"text": "one object"})),
        Case("chat_file_over_max_json_bytes", "chat", "hc-chat-oversized-file",
             "a 3 KB LLaVA json with max_json_bytes 1024", build_error("filters.max_json_bytes"),
             payload=_jl([{"id": f"c{i}", "conversations": GOOD_CHAT} for i in range(20)])),
        Case("pretrain_file_over_max_json_bytes", "image_text", "hc-pretrain-oversized-file",
             "a 3 KB LLaVA pretrain json with max_json_bytes 1024", build_error("filters.max_json_bytes"),
             payload=_jl([_entry(f"p{i}", "good.jpg") for i in range(30)])),
        Case("chat_file_raw_nul", "chat", "hc-chat-raw-nul", "a raw NUL byte inside a JSON string",
             build_error("not valid UTF-8 JSON"), payload=b'[{"id": "a", "conversations": "x\x00y"}]'),
        Case("instruct_file_deep_nesting", "instruct", "hc-instruct-deep-nesting",
             "a record nested 100,000 levels deep", build_error("RecursionError"),
             payload=b'[{"id": "a", "conversations": ' + b"[" * 100_000 + b"]" * 100_000 + b"}]"),
    ]  # fmt: skip


# --- images --------------------------------------------------------------------------------------


def _save(image: Image.Image, path: Path, **kwargs: Any) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path.read_bytes()


def write_images(root: Path) -> None:
    """The image root ``img/`` (good, converted, broken, oversized, odd-shaped, links) and ``outside/``."""
    img, outside = root / "img", root / "outside"
    good = _save(Image.new("RGB", (200, 100), RED), img / "good.jpg", quality=95)
    _save(Image.new("RGB", (90, 90), BLUE), img / "sub" / "dir" / "nested.jpg", quality=95)
    _save(Image.new("CMYK", (100, 80), (0, 255, 255, 0)), img / "cmyk.jpg")  # pure red in CMYK
    grey16 = Image.fromarray(np.full((70, 90), 40000, dtype=np.uint16))
    assert grey16.mode == "I;16"
    _save(grey16, img / "grey16.png")
    frames = [Image.new("RGB", (50, 50), c).convert("P") for c in ((0, 0, 255), (255, 255, 0), (0, 255, 0))]
    frames[0].save(img / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    (img / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (img / "zero.jpg").write_bytes(b"")
    (img / "text.jpg").write_bytes(b"GIF89a? no: these bytes are not an image at all\n" * 4)
    _save(Image.new("1", (6000, 6000), 0), img / "bomb.png")  # 36 Mpx in a few KB (> 2x the 1 Mpx limit)
    _save(Image.new("L", (1200, 1000), 128), img / "large.png")  # 1.2 Mpx > max_image_pixels 1 Mpx
    _save(Image.new("RGB", (6, 40), (1, 2, 3)), img / "tiny.png")  # below min_image_side 8
    _save(Image.new("RGB", (420, 20), (9, 9, 9)), img / "wide.png")  # 21:1 > max_aspect_ratio 20
    _save(Image.new("RGB", (10, 300), (9, 9, 9)), img / "tall.png")  # 1:30
    _save(Image.new("RGB", (8000, 6), (9, 9, 9)), img / "extreme.png")  # img2dataset upscaled it to 85333x64
    half = Image.new("RGBA", (80, 40), (*BLUE, 0))  # right half transparent (blue under alpha 0)
    half.paste(Image.new("RGBA", (40, 40), (*RED, 255)), (0, 0))
    _save(half, img / "alpha.png")
    palette = Image.new("P", (40, 40), 1)
    palette.putpalette([*RED, *BLUE] + [0, 0, 0] * 254)
    _save(palette, img / "palette_alpha.png", transparency=1)  # index 1 (blue) transparent: white
    turned = Image.new("RGB", (100, 50), RED)
    turned.paste(Image.new("RGB", (50, 50), BLUE), (50, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display (red ends on top)
    _save(turned, img / "rotated.jpg", quality=95, exif=exif.tobytes())
    _save(Image.new("RGB", (64, 64), (255, 255, 255)), outside / "secret.jpg")
    (img / "escape.jpg").symlink_to(outside / "secret.jpg")
    (img / "inside_link.jpg").symlink_to("good.jpg")
    loop = root / "img-loop"
    _save(Image.new("RGB", (200, 100), RED), loop / "good.jpg", quality=95)
    (loop / "loop_a.jpg").symlink_to("loop_b.jpg")
    (loop / "loop_b.jpg").symlink_to("loop_a.jpg")


@dataclass(frozen=True)
class ImageCase:
    """One image file of the corpus and the fate it must have on every route (URL, LLaVA json, instruct)."""

    file: str
    """Path under ``img/``."""
    fate: Fate
    """``KEPT`` or ``rejected(reason)``, with the filters of ``IMAGE_FILTERS``."""
    regions: tuple[tuple[tuple[float, float, float, float], tuple[int, int, int]], ...] = ()
    """Kept: ``((left, top, right, bottom) as fractions of the stored image, RGB))`` to find there."""
    portrait: bool | None = None
    """Kept: whether the stored image is taller than wide (EXIF orientation applied)."""


WHOLE = (0.2, 0.2, 0.8, 0.8)
IMAGE_FILTERS = "{max_caption_chars: 200, max_image_pixels: 1000000}"
"""The filters of the route specs: min_image_side 8 and max_aspect_ratio 20 are the defaults."""
IMAGE_CASES = [
    ImageCase("good.jpg", KEPT, ((WHOLE, RED),), False),
    ImageCase("sub/dir/nested.jpg", KEPT, ((WHOLE, BLUE),)),
    ImageCase("cmyk.jpg", KEPT, ((WHOLE, (255, 0, 0)),)),
    ImageCase("grey16.png", KEPT, ((WHOLE, GREY16),)),
    ImageCase("anim.gif", KEPT, ((WHOLE, (0, 0, 255)),)),
    ImageCase("alpha.png", KEPT, (((0.1, 0.2, 0.4, 0.8), RED), ((0.6, 0.2, 0.9, 0.8), (255, 255, 255)))),
    ImageCase("palette_alpha.png", KEPT, ((WHOLE, (255, 255, 255)),)),
    ImageCase("rotated.jpg", KEPT, (((0.2, 0.1, 0.8, 0.4), RED), ((0.2, 0.6, 0.8, 0.9), BLUE)), True),
    ImageCase("truncated.jpg", rejected("decode_error")),
    ImageCase("zero.jpg", rejected("decode_error")),
    ImageCase("text.jpg", rejected("decode_error")),
    ImageCase("bomb.png", rejected("image_too_large")),
    ImageCase("large.png", rejected("image_too_large")),
    ImageCase("tiny.png", rejected("image_too_small")),
    ImageCase("extreme.png", rejected("image_too_small")),
    ImageCase("wide.png", rejected("bad_aspect_ratio")),
    ImageCase("tall.png", rejected("bad_aspect_ratio")),
]
"""Every image file of the corpus (``write_images``) with its one fate."""


# --- the corpus ----------------------------------------------------------------------------------


def cases() -> list[Case]:
    """Every case, grouped by dataset, in source order."""
    return [
        *_text_cases(),
        *_chat_cases(),
        *_instruct_cases(),
        *_pretrain_cases(),
        *_url_cases(),
        *_loop_cases(),
        *_file_cases(),
    ]


def datasets(table: list[Case]) -> list[str]:
    """The dataset names of a table, in first-appearance order."""
    return list(dict.fromkeys(c.dataset for c in table))


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def write_corpus(root: Path) -> list[Case]:
    """Write every source, image and spec of the corpus under ``root``; return the table."""
    table = cases()
    write_images(root)
    _write_text(root, table)
    for dataset in ("hc-chat", "hc-instruct", "hc-pretrain", "hc-instruct-symlink-loop"):
        _write_records(root, dataset, table)
    _write_urls(root, table)
    for case in table:
        if isinstance(case.fate, tuple) and case.fate[0] == "build_error":
            _write(root / SOURCES[case.dataset], case.payload)
    for name in SPECS:
        _write(root / "specs" / f"{name}.yaml", spec_text(name).encode())
    return table


def fate_text(fate: Fate) -> str:
    """A fate as the docs write it."""
    if fate == KEPT:
        return "kept"
    return f"rejected: `{fate[1]}`" if fate[0] == "rejected" else f"build fails: {fate[1]}"


def markdown_table(table: list[Case]) -> str:
    """The corpus as a markdown table (the one in ``docs/untrusted-inputs.md``)."""
    lines = ["| kind | dataset | case | input | fate |", "|---|---|---|---|---|"]
    for c in table:
        what = c.what.replace("|", "\\|").replace("<image>", "`<image>`")
        fate = fate_text(c.fate) + (" (**not yet**: known bug, test is xfail)" if c.known_bug else "")
        lines.append(f"| {c.kind} | {c.dataset} | `{c.id}` | {what} | {fate} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # `python tests/hostile_corpus.py`: the table for docs/untrusted-inputs.md
    print(markdown_table(cases()), end="")
