"""Recipes as files: every file validates, stage identities are those of the former code rows, bases
resolve, errors name file, line and field, and a team's folder is searched first."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.core.identity import hash_json
from tasks.train.recipe_files import (
    RECIPE_DIR,
    RecipeError,
    load_recipe,
    load_recipes,
    read_recipe_file,
    recipe_files,
)
from tasks.train.recipe_schema import stage_dict

# hash_json(stage_dict(stage)) of every stage when the recipes were rows in tasks/train/recipes.py: a stage
# written as a file must keep its identity (its finished outputs are found again).
IDENTITIES = {
    "mobilevlm-1.7b": ["5c6c7246ec16aa18", "47e9424a568ef80a", "920a642f58c38dd9", "afcf964bc5e66d47"],
    "mobilevlm-3b": ["a9afc39e02598f81", "91177a5f72b39b82", "aa7db1fff061bb04", "f430199512a44b5b"],
    "tiny": ["0a6a747014076471", "745543b1b7e12d63", "5983a1f78f397df1", "d2cfacaafc383431"],
    "tiny-v2": ["0a6a747014076471", "745543b1b7e12d63", "2ae0e8c39bd5135f", "7b636cdc8222ecbd"],
}
"""Stage identities; tiny's vlm-instruct (and tiny-v2's, inherited) changed on purpose on 2026-12-03:
8 epochs instead of 4 (was 60a76d333ea71f2d and a5a5a928dd3977c7); the paper rows' llm-sft on the
same day: enabled with the authors' SFT settings and data (was 2faeb02d9762ddf3 and adee8afd4e8628e6);
tiny's VLM stages on 2026-12-04: seq_len counts text tokens only now, so 113 and 177 keep the samples
of 256 and 320 (was 2dace4e7a3ae79c4, edcb196ccd22d35b; tiny-v2 bda242f543f6d602, 20ee1cdb6fbbeb89);
tiny-v2's vlm-align the same day: V2's pre-training, LLM + projector at two rates (was 00073d780ed8a05f).
Recipes added later are not listed."""


def test_every_recipe_file_loads_with_the_identities_of_the_former_rows() -> None:
    recipes = load_recipes([RECIPE_DIR])
    assert set(IDENTITIES) <= set(recipes)
    for name, expected in IDENTITIES.items():
        assert [hash_json(stage_dict(s)) for s in recipes[name].stages] == expected, name
    tiny = recipes["tiny"]
    assert isinstance(tiny.stage("llm-pretrain").epochs, int)  # kept as written
    assert tiny.stage("llm-pretrain").optim.betas == (0.9, 0.95)
    assert recipes["mobilevlm-3b"].stage("vlm-instruct").zero_stage == 3


def _write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


def test_a_recipe_extends_its_base_and_overrides_field_by_field(tmp_path: Path) -> None:
    _write(tmp_path, "faster", """\
name: faster
base: tiny
stages:
  - name: llm-pretrain
    optim: {lr: 0.01}
    max_steps: 5
  - name: vlm-instruct
    enabled: false
""")  # fmt: skip
    recipe = load_recipe("faster", recipe_files([tmp_path, RECIPE_DIR]))
    tiny = load_recipe("tiny", recipe_files([RECIPE_DIR]))
    pre = recipe.stage("llm-pretrain")
    assert pre.optim.lr == 0.01 and pre.optim.betas == tiny.stage("llm-pretrain").optim.betas
    assert pre.max_steps == 5 and pre.seq_len == 128 and pre.datasets == tiny.stage("llm-pretrain").datasets
    assert [s.name for s in recipe.enabled_stages()] == ["llm-pretrain", "vlm-align"]
    assert recipe.description == tiny.description


def test_recipe_knowledge_lives_in_the_file_and_is_inherited(tmp_path: Path) -> None:
    recipes = load_recipes([RECIPE_DIR])
    assert recipes["tiny"].quant_types == ("q8_0", "q4_0") == recipes["tiny-v2"].quant_types  # from its base
    assert recipes["mobilevlm-1.7b"].quant_types == ("q4_k_s", "q8_0")  # the paper's types by default
    assert recipes["tiny"].evaluate == ("llm-pretrain", "vlm-instruct")
    assert recipes["tiny-v2"].model_name("vlm-instruct") == "tiny-v2-mobilevlm-instruct"
    assert recipes["tiny"].model_name("q4_0") == "tiny-gguf-q4_0"
    _write(
        tmp_path,
        "mine",
        """\
name: mine
base: tiny
quant_types: [q4_k_s]
evaluate: [vlm-instruct]
model_names: {vlm-instruct: my-vlm}
""",
    )
    mine = load_recipe("mine", recipe_files([tmp_path, RECIPE_DIR]))
    assert mine.quant_types == ("q4_k_s",) and mine.evaluate == ("vlm-instruct",)
    assert (
        mine.model_name("vlm-instruct") == "mine-my-vlm"
        and mine.model_name("vlm-align") == "mine-mobilevlm-aligned"
    )
    assert [hash_json(stage_dict(s)) for s in mine.stages] == IDENTITIES["tiny"]  # stage identities unchanged
    _write(tmp_path, "typo", "name: typo\nbase: tiny\nevaluate: [vlm-instrukt]\n")
    with pytest.raises(
        RecipeError, match=r"typo.yaml: evaluate: \['vlm-instrukt'\] are not stages of recipe typo"
    ):
        load_recipe("typo", recipe_files([tmp_path, RECIPE_DIR]))


def test_the_tiny_recipe_names_the_sample_worlds_question_types(tmp_path: Path) -> None:
    from model.image import COLOURS
    from tasks.testkit.samples import KINDS, QUESTION_TEMPLATES
    from tasks.train.evaluate import pattern_classifier

    classify = pattern_classifier(load_recipe("tiny", recipe_files([RECIPE_DIR])).question_types)
    assert classify is not None and pattern_classifier({}) is None
    for kind, templates in QUESTION_TEMPLATES.items():
        for template in templates:
            for colour in COLOURS:
                for shape in KINDS:
                    question = "<image>\n" + template.format(colour=colour, kind=shape)
                    assert classify(question) == kind, question
    assert classify("<image>\nWhat is the meaning of life?") is None
    _write(tmp_path, "badre", "name: badre\nbase: tiny\nquestion_types: {colour: ['What (colour']}\n")
    with pytest.raises(RecipeError, match=r"badre.yaml: question_types.colour: 'What \(colour' is not a"):
        load_recipe("badre", recipe_files([tmp_path, RECIPE_DIR]))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: bad\nstages:\n  - name: llm-pretrain\n    lr: 0.1\n",
         r"bad.yaml:4: stages.0.lr: unknown key; allowed keys here: name, model, datasets"),
        ("name: bad\nstages:\n  - name: llm-pretrain\n    micro_batch: many\n",
         r"bad.yaml:4: stages.0.micro_batch: Input should be a valid integer"),
        ("name: bad\nstages:\n  - name: pretraining\n", r"bad.yaml:3: stages.0.name: Input should be"),
        ("name: other\n", r"bad.yaml:1: name: recipe name 'other' must equal the file name 'bad'"),
        ("name: bad\nstages: [\n", r"bad.yaml:3: invalid YAML"),
        ("name: bad\nname: again\n", r"bad.yaml:2: invalid YAML: duplicate key 'name' \(first at line 1\)"),
        ("name: bad\nstages:\n  - name: llm-pretrain\n    model: tiny-llama\n",
         r"bad.yaml:3: stages.0 \(llm-pretrain\): missing datasets, train, optim, global_batch, micro_batch, "
         r"seq_len, zero_stage: set it in this file or in its base recipe"),
        ("name: bad\nbase: nowhere\n", r"bad.yaml: base: recipe 'bad' extends 'nowhere', which is not"),
    ],
)  # fmt: skip
def test_recipe_errors_name_file_line_and_field(tmp_path: Path, text: str, expected: str) -> None:
    _write(tmp_path, "bad", text)
    with pytest.raises(RecipeError, match=expected):
        load_recipes([tmp_path, RECIPE_DIR])


def test_bases_in_a_circle_are_refused_and_every_bad_file_is_listed(tmp_path: Path) -> None:
    _write(tmp_path, "a", "name: a\nbase: b\n")
    _write(tmp_path, "b", "name: b\nbase: a\n")
    _write(tmp_path, "c", "name: c\nstages: 3\n")
    with pytest.raises(RecipeError) as err:
        load_recipes([tmp_path])
    text = str(err.value)
    assert "recipes extend each other in a circle: a -> b -> a" in text
    assert "c.yaml:2: stages: Input should be a valid list" in text
    assert read_recipe_file(RECIPE_DIR / "tiny.yaml")["name"] == "tiny"


def test_the_team_folder_is_searched_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ours = tmp_path / "team"
    _write(ours, "tiny", "name: tiny\ndescription: the team's tiny\nbase: tiny-v2\n")
    monkeypatch.setenv("MVLM_RECIPE_DIR", str(ours))
    files = recipe_files()
    assert (
        files["tiny"] == ours / "tiny.yaml" and files["mobilevlm-1.7b"] == RECIPE_DIR / "mobilevlm-1.7b.yaml"
    )
    with pytest.raises(
        RecipeError, match="circle: tiny -> tiny-v2 -> tiny"
    ):  # tiny-v2 extends the team's tiny
        load_recipe("tiny", files)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local", "prefect_api")
def test_a_team_recipe_and_spec_outside_the_repository_run_through_retrain(
    tmp_path: Path, samples_root: Path
) -> None:
    """A team's own dataset spec (their text files) and recipe (one short pretraining stage on it), in
    folders outside the repository named by MVLM_SPEC_DIR and MVLM_RECIPE_DIR: `mvlm retrain` builds
    the data and trains the stage, with no code change."""
    import json
    import random

    from typer.testing import CliRunner

    from flows.cli import app

    work, team = tmp_path / "work", tmp_path / "team"
    (work / "data").mkdir(parents=True)
    (work / "data" / "samples").symlink_to(samples_root / "samples")
    notes = team / "notes.jsonl"
    notes.parent.mkdir(parents=True)
    words = [
        "the",
        "a",
        "red",
        "blue",
        "green",
        "yellow",
        "square",
        "circle",
        "triangle",
        "sits",
        "left",
        "right",
        "of",
        "above",
        "below",
        "near",
    ]
    rng = random.Random(0)
    docs = (" ".join(rng.choice(words) for _ in range(80)) for _ in range(40))  # distinct: no dedup
    notes.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    _write(team / "specs", "team-notes", f"""\
name: team-notes
kind: text
profile: tiny
description: The team's own notes.
license: CC0-1.0
tokenizer: samples/tokenizer
seq_len: 64
shard_samples: 32
heldout_fraction: 0.1
subsets:
  - {{name: notes, source: {{type: files, paths: [{notes}]}}}}
""")  # fmt: skip
    _write(team / "recipes", "team-pretrain", """\
name: team-pretrain
description: A short pretraining of tiny-llama on the team's notes
stages:
  - name: llm-pretrain
    model: tiny-llama
    datasets: [{spec: team-notes}]
    train: [llm]
    optim: {lr: 3.0e-3}
    global_batch: 4
    micro_batch: 4
    seq_len: 64
    zero_stage: 1
    max_steps: 6
    init: scratch
    checkpoint_every: 3
    eval_samples: 8
""")  # fmt: skip
    env = {"MVLM_WORK_DIR": str(work), "MVLM_SPEC_DIR": str(team / "specs"),
           "MVLM_RECIPE_DIR": str(team / "recipes"), "COLUMNS": "250"}  # fmt: skip
    listed = CliRunner().invoke(app, ["recipes"], env=env)
    assert listed.exit_code == 0 and "team-pretrain" in listed.output and "tiny-v2" in listed.output
    out = CliRunner().invoke(app, ["retrain", "team-pretrain", "--until", "train"], env=env)
    assert out.exit_code == 0, out.output
    assert "team-notes" in out.output and "llm-pretrain" in out.output and "trained" in out.output
    stage_dirs = [p for p in (work / "runs" / "team-pretrain" / "llm-pretrain").iterdir() if p.is_dir()]
    assert len(stage_dirs) == 1 and (stage_dirs[0] / "final" / "model.safetensors").is_file()


def test_recipes_validate_command_names_the_problem_and_passes_good_files(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    good = _write(
        tmp_path, "short", "name: short\nbase: tiny\nstages:\n  - {name: llm-pretrain, max_steps: 3}\n"
    )
    bad = _write(tmp_path, "typo", "name: typo\nbase: tiny\nstages:\n  - name: vlm-align\n    epoch: 2\n")
    ok = CliRunner().invoke(app, ["recipes", "validate", str(good)], env={"COLUMNS": "250"})
    assert ok.exit_code == 0 and "ok" in ok.output and "llm-pretrain, vlm-align, vlm-instruct" in ok.output
    failed = CliRunner().invoke(app, ["recipes", "validate", str(good), str(bad)], env={"COLUMNS": "250"})
    assert failed.exit_code == 1
    assert f"{bad}:5: stages.0.epoch: unknown key; allowed keys here: name, model" in failed.output
    every = CliRunner().invoke(app, ["recipes", "validate"], env={"COLUMNS": "250"})
    assert every.exit_code == 0 and f"{len(recipe_files())} recipe(s) valid" in every.output
