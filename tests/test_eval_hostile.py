"""Hostile evaluation files, case by case: each case breaks one thing in a private copy of the tiny
benchmark replicas and asserts what the reader does with it (one counted reject with its reason and
place, or an error naming the file), never a silent score. ``docs/untrusted-inputs.md`` carries
``markdown_table()``; a test keeps it in sync (``python tests/test_eval_hostile.py`` prints it)."""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tasks.quality.eval_files import EvalSetError
from tasks.quality.eval_sets import read_eval_set
from tasks.quality.eval_specs import find_eval_spec

GQA_Q = "samples/eval/gqa/llava_gqa_testdev_balanced.jsonl"
GQA_A = "samples/eval/gqa/testdev_balanced_questions.json"
GQA_IMAGES = "samples/eval/gqa/images"
MMB = "samples/eval/mmbench/mmbench_dev_en_20231003.tsv"
SQA_Q = "samples/eval/sqa/llava_test_CQM-A.json"
SQA_P = "samples/eval/sqa/problems.json"
TVQA_A = "samples/eval/textvqa/TextVQA_0.5.1_val.json"
MME_Q = "samples/eval/mme/llava_mme.jsonl"
POPE_L = "samples/eval/pope/coco/coco_pope_adversarial.json"
DOC = Path(__file__).resolve().parent.parent / "docs" / "untrusted-inputs.md"
TABLE_START, TABLE_END = "<!-- eval-table:start -->", "<!-- eval-table:end -->"


@dataclass(frozen=True)
class EvalCase:
    """One hostile evaluation input and what must happen to it."""

    id: str
    """Unique case id (the test id)."""
    eval_set: str
    """The tiny eval spec read."""
    what: str
    """What the input is, for people."""
    fate: tuple[str, str]
    """``("rejected", reason)``: one reject with that reason, in ``file``; ``("error", text)``: the
    reading fails with a message holding ``text`` and the file's name."""
    file: str
    """The file the case breaks (relative to the data root)."""
    edit: Callable[[Path], None]
    """Breaks the copy of the replicas under the given root."""
    reported_in: str = ""
    """The file a reject's place names, when it is not ``file`` (the question that the broken file
    leaves without a reference)."""


def _line(relative: str, number: int, content: bytes) -> Callable[[Path], None]:
    """Replace line ``number`` (1-based) of a jsonl file with ``content``."""

    def edit(root: Path) -> None:
        path = root / relative
        lines = path.read_bytes().split(b"\n")
        lines[number - 1] = content
        path.write_bytes(b"\n".join(lines))

    return edit


def _row(relative: str, number: int, **changes) -> Callable[[Path], None]:
    """Change fields of the JSON object on line ``number`` of a jsonl file (None removes a field)."""

    def edit(root: Path) -> None:
        path = root / relative
        lines = path.read_text().splitlines()
        row = json.loads(lines[number - 1])
        row.update(changes)
        lines[number - 1] = json.dumps({k: v for k, v in row.items() if v is not None})
        path.write_text("\n".join(lines) + "\n")

    return edit


def _first_gqa_image(root: Path) -> Path:
    name = json.loads((root / GQA_Q).read_text().splitlines()[0])["image"]
    return root / GQA_IMAGES / name


def _image_bytes(data: bytes) -> Callable[[Path], None]:
    return lambda root: _first_gqa_image(root).write_bytes(data)


def _symlink_out(root: Path) -> None:
    outside = root.parent / "outside.jpg"
    shutil.copy(_first_gqa_image(root), outside)
    _first_gqa_image(root).unlink()
    _first_gqa_image(root).symlink_to(outside)


def _png_header(width: int, height: int) -> bytes:
    """A PNG signature, an IHDR chunk claiming ``width`` x ``height`` and an empty IDAT (no pixels)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunks = b""
    for name, data in ((b"IHDR", ihdr), (b"IDAT", b"")):
        chunks += struct.pack(">I", len(data)) + name + data + struct.pack(">I", zlib.crc32(name + data))
    return b"\x89PNG\r\n\x1a\n" + chunks


def _whole(relative: str, data: bytes) -> Callable[[Path], None]:
    return lambda root: (root / relative).write_bytes(data)


def _json_edit(relative: str, change: Callable[[object], object]) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        path = root / relative
        path.write_text(json.dumps(change(json.loads(path.read_text()))))

    return edit


def _tsv_cell(relative: str, row: int, column: str, value: str) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        path = root / relative
        lines = path.read_text().splitlines()
        header = lines[0].split("\t")
        cells = lines[row].split("\t")
        cells[header.index(column)] = value
        lines[row] = "\t".join(cells)
        path.write_text("\n".join(lines) + "\n")

    return edit


def _drop_last_line(relative: str) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        path = root / relative
        path.write_text("".join(path.read_text().splitlines(True)[:-1]))

    return edit


def _drop_first_sqa_problem(problems: object) -> object:
    assert isinstance(problems, dict)
    return dict(list(problems.items())[1:])


def _drop_first_annotation(release: object) -> object:
    assert isinstance(release, dict)
    return {**release, "data": release["data"][1:]}


def _rejected(reason: str) -> tuple[str, str]:
    return ("rejected", reason)


def cases() -> list[EvalCase]:
    """The table: what each hostile input is and what must happen to it."""
    gqa, mmb = "tiny-gqa", "tiny-mmbench"
    return [
        EvalCase("gqa-path-traversal", gqa, "question image `../../../../etc/hostname`",
                 _rejected("unsafe_path"), GQA_Q, _row(GQA_Q, 1, image="../../../../etc/hostname")),
        EvalCase("gqa-absolute-path", gqa, "question image `/etc/hostname`", _rejected("unsafe_path"), GQA_Q,
                 _row(GQA_Q, 1, image="/etc/hostname")),
        EvalCase("gqa-image-not-a-string", gqa, 'question image `{"a": 1}` (an object)',
                 _rejected("unsafe_path"), GQA_Q, _row(GQA_Q, 1, image={"a": 1})),
        EvalCase("gqa-symlink-escape", gqa, "image file is a symlink to a file outside the image folder",
                 _rejected("unsafe_path"), GQA_Q, _symlink_out),
        EvalCase("gqa-image-random-bytes", gqa, "image file holds random bytes", _rejected("decode_error"),
                 GQA_Q, _image_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)),
        EvalCase("gqa-image-empty", gqa, "image file is empty", _rejected("decode_error"), GQA_Q,
                 _image_bytes(b"")),
        EvalCase("gqa-pixel-bomb", gqa, "PNG header claiming 60000 x 60000 pixels",
                 _rejected("image_too_large"), GQA_Q, _image_bytes(_png_header(60_000, 60_000))),
        EvalCase("gqa-raw-nul", gqa, "question line with raw NUL bytes", _rejected("invalid_json"), GQA_Q,
                 _line(GQA_Q, 1, b'{"question_id": "\x00\x00", \x00}')),
        EvalCase("gqa-not-utf8", gqa, "question line that is not UTF-8", _rejected("invalid_json"), GQA_Q,
                 _line(GQA_Q, 1, b'{"text": "\xff\xfe caf\xe9"}')),
        EvalCase("gqa-deep-nesting", gqa, "question line of 100,000 nested arrays", _rejected("invalid_json"),
                 GQA_Q, _line(GQA_Q, 1, b"[" * 100_000 + b"]" * 100_000)),
        EvalCase("gqa-json-array-line", gqa, "question line that is a JSON array, not an object",
                 _rejected("invalid_json"), GQA_Q, _line(GQA_Q, 1, b'["question_id", "text"]')),
        EvalCase("gqa-oversized-line", gqa, "question line of 5 MB", _rejected("oversized_line"), GQA_Q,
                 _line(GQA_Q, 1, b'{"text": "' + b"a" * 5_000_000 + b'"}')),
        EvalCase("gqa-missing-text", gqa, "question without its `text`", _rejected("missing_field"), GQA_Q,
                 _row(GQA_Q, 1, text=None)),
        EvalCase("gqa-no-answer", gqa, "question id absent from the answers file", _rejected("no_reference"),
                 GQA_Q, _row(GQA_Q, 1, question_id="999")),
        EvalCase("gqa-answers-truncated", gqa, "answers file cut in the middle", ("error", "JSON"), GQA_A,
                 lambda root: (root / GQA_A).write_bytes((root / GQA_A).read_bytes()[:500])),
        EvalCase("gqa-answers-not-an-object", gqa, "answers file is a JSON list",
                 ("error", "testdev_balanced_questions.json"), GQA_A, _whole(GQA_A, b"[1, 2, 3]")),
        EvalCase("mmbench-bad-base64", mmb, "MMBench row whose image is not base64",
                 _rejected("decode_error"), MMB, _tsv_cell(MMB, 1, "image", "not base64 at all!")),
        EvalCase("mmbench-unknown-option", mmb, "answer letter `E` with options A-C",
                 _rejected("unknown_option"), MMB, _tsv_cell(MMB, 1, "answer", "E")),
        EvalCase("mmbench-bad-index", mmb, "index `x1` (not a number)", _rejected("missing_field"), MMB,
                 _tsv_cell(MMB, 1, "index", "x1")),
        EvalCase("sqa-no-problem", "tiny-sqa", "question whose problem is not in problems.json",
                 _rejected("no_reference"), SQA_Q, _json_edit(SQA_P, _drop_first_sqa_problem)),
        EvalCase("textvqa-no-annotation", "tiny-textvqa", "question with no annotation in the release file",
                 _rejected("no_reference"), "samples/eval/textvqa/llava_textvqa_val_v051_ocr.jsonl",
                 _json_edit(TVQA_A, _drop_first_annotation)),
        EvalCase("mme-unknown-subtask", "tiny-mme", "question of a subtask folder that does not exist",
                 _rejected("no_reference"), MME_Q, _row(MME_Q, 1, category="../../etc")),
        EvalCase("pope-unknown-label", "tiny-pope", "label `maybe` (neither yes nor no)",
                 _rejected("no_reference"), POPE_L, _row(POPE_L, 1, label="maybe"),
                 "samples/eval/pope/llava_pope_test.jsonl"),
        EvalCase("pope-labels-out-of-step", "tiny-pope", "labels file one row short of the questions",
                 ("error", "coco_pope_adversarial"), POPE_L,
                 _drop_last_line(POPE_L)),
    ]  # fmt: skip


CASES = cases()


@pytest.fixture
def root(eval_replicas: Path, tmp_path: Path) -> Path:
    shutil.copytree(eval_replicas, tmp_path / "root", symlinks=True)
    return tmp_path / "root"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_each_hostile_eval_input_has_its_fate(case: EvalCase, root: Path) -> None:
    spec = find_eval_spec(case.eval_set)[1]
    clean = len(read_eval_set(spec, root).items)
    case.edit(root)
    kind, text = case.fate
    if kind == "error":
        with pytest.raises(EvalSetError) as err:
            read_eval_set(spec.model_copy(update={"max_failure_ratio": 1.0}), root)
        message = str(err.value)
        assert text in message and Path(case.file).name in message, message
        assert "Traceback" not in message
        return
    with pytest.raises(EvalSetError, match=text):  # the default tolerance is none: the set is refused
        read_eval_set(spec, root)
    eval_set = read_eval_set(spec.model_copy(update={"max_failure_ratio": 1.0}), root)
    reasons = eval_set.rejects.counts()
    assert set(reasons) == {text}, reasons
    rejected = [r for r in eval_set.rejects.items if r.reason == text]
    assert all(Path(r.source).name == Path(case.reported_in or case.file).name for r in rejected), rejected
    assert len(eval_set.items) + reasons[text] >= clean - 1  # nothing else vanished with it
    assert len(eval_set.items) < clean  # the broken question is not scored


def markdown_table() -> str:
    """The cases as the markdown table in ``docs/untrusted-inputs.md``."""
    lines = ["| set | case | input | fate |", "|---|---|---|---|"]
    for c in CASES:
        fate = f"reject `{c.fate[1]}`" if c.fate[0] == "rejected" else f"error naming `{Path(c.file).name}`"
        what = c.what.replace("|", "\\|")
        lines.append(f"| {c.eval_set} | `{c.id}` | {what} | {fate} |")
    return "\n".join(lines) + "\n"


def test_the_docs_carry_the_eval_case_table() -> None:
    text = DOC.read_text()
    assert TABLE_START in text and TABLE_END in text, f"{DOC} lacks the eval table markers"
    table = text.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0].strip() + "\n"
    assert table == markdown_table(), "regenerate it: .venv/bin/python tests/test_eval_hostile.py"


if __name__ == "__main__":
    print(markdown_table(), end="")
