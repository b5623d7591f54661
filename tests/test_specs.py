"""Dataset specs: every shipped file validates; bad specs get file:line:field errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from tasks.data.specs import SpecError, load_all, load_spec, parse_spec, spec_files

VALID = """\
name: demo
kind: text
license: CC0-1.0
tokenizer: samples/tokenizer
seq_len: 64
subsets:
  - name: web
    weight: 3
    source: {type: files, paths: [web.jsonl]}
"""


@pytest.mark.parametrize("path", spec_files(), ids=lambda p: p.stem)
def test_every_shipped_spec_validates(path: Path) -> None:
    spec = load_spec(path)
    assert spec.name == path.stem
    assert abs(sum(spec.weights().values()) - 1.0) < 1e-9


def test_shipped_specs_cover_the_paper_datasets() -> None:
    specs = {name: spec for name, (_, spec) in load_all().items()}
    real = {n for n, s in specs.items() if s.profile == "real"}
    assert {"redpajama-v1", "cc3m", "llava-pretrain-558k", "llava-instruct-158k", "llava-v1.5-mix665k",
            "sharegpt"} <= real  # fmt: skip
    tiny = {n: s.kind for n, s in specs.items() if s.profile == "tiny"}
    assert set(tiny.values()) == {"text", "image_text", "instruct", "chat"}
    weights = specs["redpajama-v1"].weights()
    paper = {"arxiv": 2.5, "book": 4.5, "c4": 15.0, "common_crawl": 67.7, "github": 4.5, "stackexchange": 2.0,
             "wikipedia": 4.5}  # fmt: skip
    assert weights == pytest.approx({k: v / 100.7 for k, v in paper.items()})
    assert specs["redpajama-v1"].seq_len == 2048


def test_valid_spec_parses() -> None:
    spec = parse_spec(VALID)
    assert spec.kind == "text" and spec.subsets[0].source.paths == ["web.jsonl"]


def _problems(text: str) -> list[str]:
    with pytest.raises(SpecError) as err:
        parse_spec(text, "demo.yaml")
    return err.value.problems


def test_unknown_key_names_line_path_and_allowed_keys() -> None:
    text = VALID.replace("    source: {type: files, paths: [web.jsonl]}", "    source:\n      type: files\n"
                         "      paths: [web.jsonl]\n      colour: red")  # fmt: skip
    (problem,) = _problems(text)
    assert problem.startswith("demo.yaml:12: subsets.0.source.colour: unknown key")
    assert "type, paths, format, text_field" in problem


def test_bad_enum_lists_allowed_values() -> None:
    (problem,) = _problems(VALID.replace("kind: text", "kind: txt"))
    assert problem.startswith("demo.yaml:2: kind:")
    assert "'text', 'image_text', 'instruct' or 'chat'" in problem


def test_top_level_unknown_key_and_bad_number_are_both_reported() -> None:
    problems = _problems(VALID.replace("seq_len: 64", "seq_len: -1\nshard_size: 5"))
    assert any(p.startswith("demo.yaml:5: seq_len: Input should be greater than 0") for p in problems)
    assert any(p.startswith("demo.yaml:6: shard_size: unknown key") for p in problems)


def test_duplicate_yaml_key_is_an_error() -> None:
    (problem,) = _problems(VALID.replace("seq_len: 64", "seq_len: 64\nseq_len: 32"))
    assert problem == "demo.yaml:6: invalid YAML: duplicate key 'seq_len' (first at line 5)"


def test_yaml_is_loaded_safely() -> None:
    (problem,) = _problems(VALID + "description: !!python/object/apply:os.system ['echo pwned']\n")
    assert "invalid YAML" in problem and "python/object" in problem


def test_literal_credentials_are_refused() -> None:
    text = VALID.replace(
        "{type: files, paths: [web.jsonl]}", "{type: hf, dataset: a/b, revision: main, token: hf_abc}"
    )
    (problem,) = _problems(text)
    assert "environment reference like ${HF_TOKEN}" in problem
    ok = text.replace("token: hf_abc", "token: '${HF_TOKEN}'")
    assert parse_spec(ok).subsets[0].source.token == "${HF_TOKEN}"


def test_kind_requirements() -> None:
    (problem,) = _problems(VALID.replace("seq_len: 64\n", ""))
    assert "kind 'text' requires field(s) ['seq_len']" in problem
    (problem,) = _problems(VALID.replace("kind: text", "kind: instruct\nimage_size: 64"))
    assert "source type 'files' not allowed for kind 'instruct'; allowed: ['llava_json']" in problem


def test_file_name_must_match_spec_name(tmp_path: Path) -> None:
    (tmp_path / "other.yaml").write_text(VALID)
    with pytest.raises(SpecError, match="must equal the file name 'other'"):
        load_spec(tmp_path / "other.yaml")


def test_cli_validate_reports_errors_and_exit_code(tmp_path: Path) -> None:
    runner = CliRunner()
    good = tmp_path / "demo.yaml"
    good.write_text(VALID)
    bad = tmp_path / "broken.yaml"
    bad.write_text(VALID.replace("name: demo", "name: broken").replace("kind: text", "kind: txt"))
    result = runner.invoke(app, ["data", "validate", str(good)])
    assert result.exit_code == 0 and "ok" in result.output
    result = runner.invoke(app, ["data", "validate", str(good), str(bad)])
    assert result.exit_code == 1
    assert "broken.yaml:2: kind:" in result.output.replace("\n", "")
    assert runner.invoke(app, ["data", "validate"]).exit_code == 0  # every shipped spec
