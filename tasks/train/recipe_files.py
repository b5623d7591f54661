"""Recipe files: ``recipes/NAME.yaml``, one recipe each, validated against the typed schema in
``tasks.train.recipe_schema`` (whose dataclasses keep the defaults).

A file names its stages in order; a recipe may extend another (``base: tiny``) and give only what
differs: a stage of the same name takes the base stage's fields and overrides those the file sets
(``optim`` and ``lora`` field by field), a new stage is appended. Values are kept as written (an
integer stays an integer), so a stage written as a file has the identity it had as a code row.
Errors name ``file:line: field.path`` and what to do. ``MVLM_RECIPE_DIR`` names folders
(``os.pathsep``-separated) searched before the repository's ``recipes/``; a name there shadows ours.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from tasks.core.yaml_lines import has, line_of, model_at, parse_yaml, problems_of
from tasks.train.recipe_schema import MODEL_NAMES, Gate, Recipe, StageConfig

log = logging.getLogger(__name__)
RECIPE_DIR = Path(__file__).resolve().parents[2] / "recipes"
MERGED = ("optim", "lora")
"""Stage fields that a derived recipe overrides key by key (the others are replaced whole)."""


class RecipeError(ValueError):
    """Problems in recipe files, each naming file, line and field."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# --- the file schema, derived from the dataclasses --------------------------------------------------


def _as_written(annotation: Any) -> Any:
    """The file-side type of a dataclass field: ``float`` also takes an int (kept as an int), tuples
    are YAML lists, nested dataclasses are their (partial) models."""
    if annotation is float:
        return int | float
    if dataclasses.is_dataclass(annotation):
        return _partial(annotation)
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return list[_as_written(args[0])]
        return tuple[tuple(_as_written(a) for a in args)]
    if origin is dict:
        return dict[_as_written(args[0]), _as_written(args[1])]
    if origin in (types.UnionType, typing.Union):
        return typing.Union[tuple(_as_written(a) for a in args)]  # noqa: UP007
    return annotation


@cache
def _partial(cls: type, required: tuple[str, ...] = ()) -> type[BaseModel]:
    """A strict pydantic model of ``cls`` whose fields are optional (unless ``required``): a file
    may give part of a stage, the rest comes from its base or the dataclass defaults."""
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        kind = _as_written(hints[f.name])
        fields[f.name] = (kind, ...) if f.name in required else (kind | None, None)
    return create_model(f"{cls.__name__}Entry", __config__=ConfigDict(extra="forbid"), **fields)


@cache
def _file_model() -> type[BaseModel]:
    stage = _partial(StageConfig, ("name",))
    return create_model(
        "RecipeFile", __config__=ConfigDict(extra="forbid"), name=(str, ...), description=(str, ""),
        base=(str | None, None), stages=(list[stage], []), quant_types=(list[str] | None, None),
        evaluate=(list[str] | None, None), model_names=(dict[str, str] | None, None),
        question_types=(dict[str, list[str]] | None, None), eval_sets=(list[str] | None, None),
        gate=(_partial(Gate) | None, None),
    )  # fmt: skip


def _model_at(loc: tuple) -> type[BaseModel] | None:
    return model_at(_file_model(), loc)


# --- reading ---------------------------------------------------------------------------------------


def recipe_dirs() -> list[Path]:
    """Folders searched for recipe files, first wins: ``MVLM_RECIPE_DIR``'s, then ``recipes/``."""
    extra = [Path(p) for p in os.environ.get("MVLM_RECIPE_DIR", "").split(os.pathsep) if p]
    return [*extra, RECIPE_DIR]


def recipe_files(dirs: list[Path] | None = None) -> dict[str, Path]:
    """Recipe name (file stem) -> file, the first folder that has it winning."""
    found: dict[str, Path] = {}
    for folder in dirs or recipe_dirs():
        for file in sorted(Path(folder).glob("*.yaml")):
            if file.stem in found:
                log.info("recipe %s: %s shadows %s", file.stem, found[file.stem], file)
                continue
            found[file.stem] = file
    return found


def read_recipe_file(path: Path) -> dict[str, Any]:
    """One file validated on its own: the fields it sets, as written (``RecipeError`` on problems)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError([f"{path}: cannot read recipe ({err})"]) from err
    try:
        data, line_map = parse_yaml(text, str(path))
    except ValueError as err:
        raise RecipeError([str(err)]) from None
    if not isinstance(data, dict):
        raise RecipeError([f"{path}:1: a recipe must be a mapping of fields, got {type(data).__name__}"])
    try:
        entry = _file_model().model_validate(data)
    except ValidationError as err:
        raise RecipeError(problems_of(err, str(path), data, line_map, _model_at, top="(recipe)")) from None
    if entry.name != path.stem:
        problem = f"recipe name {entry.name!r} must equal the file name {path.stem!r}"
        raise RecipeError([f"{path}:1: name: {problem}"])
    out = entry.model_dump(exclude_unset=True)
    out["stages"] = [_line_tagged(s, data, line_map, i, path) for i, s in enumerate(out.get("stages", []))]
    return out


def _line_tagged(stage: dict, data: dict, line_map: dict, index: int, path: Path) -> dict:
    line = line_of(data, line_map, ("stages", index, "name")) if has(data.get("stages", []), index) else 1
    return {**stage, "__where__": f"{path}:{line}: stages.{index} ({stage['name']})"}


def load_recipe(name: str, files: dict[str, Path] | None = None) -> Recipe:
    """The recipe ``name`` with its bases resolved."""
    files = files if files is not None else recipe_files()
    merged = _resolved(name, files, ())
    stages = tuple(_stage(s) for s in merged["stages"])
    extra = {
        k: tuple(merged[k]) for k in ("quant_types", "evaluate", "eval_sets") if merged.get(k) is not None
    }
    if merged.get("gate") is not None:
        extra["gate"] = _build(Gate, {k: v for k, v in merged["gate"].items() if v is not None})
    _check_eval_sets(merged.get("eval_sets") or (), extra.get("gate"), files[name])
    if merged.get("model_names") is not None:
        extra["model_names"] = {**MODEL_NAMES, **merged["model_names"]}
    if merged.get("question_types") is not None:
        extra["question_types"] = _question_types(merged["question_types"], files[name])
    names = [s.name for s in stages]
    for key in ("evaluate", "model_names"):
        unknown = [n for n in merged.get(key) or () if n not in names]
        if unknown:
            raise RecipeError([f"{files[name]}: {key}: {unknown} are not stages of recipe {name}: {names}"])
    return Recipe(name, merged.get("description", ""), stages, **extra)


def _check_eval_sets(names: Any, gate: Gate | None, path: Path) -> None:
    """Every set a recipe names is an evaluation spec; every gate minimum is one of its sets."""
    from tasks.quality.eval_specs import EvalSpecError, load_eval_specs

    try:
        known = load_eval_specs()
    except EvalSpecError as err:
        raise RecipeError(err.problems) from None
    if unknown := [n for n in names if n not in known]:
        raise RecipeError([f"{path}: eval_sets: {unknown} are not evaluation specs; known: {sorted(known)} "
                           "(add a file to eval_specs/ or fix the name)"])  # fmt: skip
    if gate and (stray := [n for n in gate.min_scores if n not in (*names, "average")]):
        raise RecipeError([f"{path}: gate.min_scores: {stray} are not in the recipe's eval_sets "
                           f"{list(names)} (or 'average')"])  # fmt: skip


def _question_types(given: dict[str, list[str]], path: Path) -> dict[str, tuple[str, ...]]:
    for kind, patterns in given.items():
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as err:
                raise RecipeError([f"{path}: question_types.{kind}: {pattern!r} is not a regular "
                                   f"expression ({err}); fix the pattern"]) from None  # fmt: skip
    return {kind: tuple(patterns) for kind, patterns in given.items()}


def _resolved(name: str, files: dict[str, Path], chain: tuple[str, ...]) -> dict[str, Any]:
    if name not in files:
        known = ", ".join(sorted(files)) or "(none)"
        what = f"recipe {chain[-1]!r} extends {name!r}, which" if chain else f"recipe {name!r}"
        raise KeyError(f"{what} is not a recipe file in {[str(d) for d in recipe_dirs()]}; known: {known}")
    if name in chain:
        circle = " -> ".join((*chain, name))
        raise RecipeError([f"{files[name]}: base: recipes extend each other in a circle: {circle}"])
    own = read_recipe_file(files[name])
    if not own.get("base"):
        return own
    base = _resolved(own["base"], files, (*chain, name))
    stages = {s["name"]: dict(s) for s in base["stages"]}
    for stage in own["stages"]:
        old = stages.get(stage["name"], {})
        new = {k: v for k, v in stage.items() if k not in MERGED}
        for key in MERGED:
            if key in stage:
                new[key] = {**(old.get(key) or {}), **stage[key]} if stage[key] is not None else None
        stages[stage["name"]] = {**old, **new}
    return {**base, **{k: v for k, v in own.items() if k != "stages"}, "stages": list(stages.values())}


def _stage(entry: dict[str, Any]) -> StageConfig:
    """A StageConfig from merged file fields; a field missing in the file and its bases is named."""
    where = entry.pop("__where__", "recipe")
    try:
        return _build(StageConfig, entry)
    except _Missing as err:
        missing = ", ".join(err.args[0])
        raise RecipeError(
            [f"{where}: missing {missing}: set it in this file or in its base recipe"]
        ) from None


class _Missing(TypeError):
    """Required fields (dotted paths) that neither a file nor its bases set."""


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """``cls`` from file fields; nested dataclasses are built from their mappings."""
    required = (f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)  # fmt: skip
    missing = [f"{prefix}{name}" for name in required if name not in data]
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        try:
            kwargs[key] = _value(hints[key], value, f"{prefix}{key}.")
        except _Missing as err:
            missing += err.args[0]
    if missing:
        raise _Missing(missing)
    return cls(**kwargs)


def _value(annotation: Any, value: Any, prefix: str) -> Any:
    if value is None:
        return None
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, prefix)
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in args if a is not type(None)]
        return _value(inner[0], value, prefix) if len(inner) == 1 else value
    if origin is tuple:
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        return tuple(_value(a, v, prefix) for a, v in zip(items, value, strict=True))
    return value


def load_recipes(dirs: list[Path] | None = None) -> dict[str, Recipe]:
    """Every recipe file, resolved; ``RecipeError`` lists the problems of every file."""
    files = recipe_files(dirs)
    recipes, problems = {}, []
    for name in files:
        try:
            recipes[name] = load_recipe(name, files)
        except RecipeError as err:
            problems.extend(p for p in err.problems if p not in problems)
        except KeyError as err:
            problems.append(f"{files[name]}: base: {err.args[0]}")
    if problems:
        raise RecipeError(problems)
    return recipes
