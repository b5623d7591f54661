"""YAML files that users write (dataset specs, recipes): the safe loader with the line of every key.

Errors in those files name ``file:line: field.path: message``; this module finds the line of a
pydantic error location and explains the common errors in our words.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError


class _LineLoader(yaml.SafeLoader):
    """Safe loader that records the line of every mapping key and refuses duplicate keys."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    mapping: dict = {}
    lines: dict = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in mapping:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {lines[key]})", key_node.start_mark
            )
        mapping[key] = loader.construct_object(value_node, deep=deep)
        lines[key] = key_node.start_mark.line + 1
    loader.line_map[id(mapping)] = (node.start_mark.line + 1, lines)
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_yaml(text: str, file: str) -> tuple[Any, dict]:
    """(data, line map) of YAML text; a syntax error raises ValueError ``file:line: invalid YAML: ...``."""
    loader = _LineLoader(text)
    loader.line_map = {}
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ValueError(f"{file}{line}: invalid YAML: {problem}") from err
    finally:
        loader.dispose()
    return data, loader.line_map


def line_of(data: Any, line_map: dict, loc: tuple) -> int:
    """Best line for a pydantic error location: the deepest mapping key on the path."""
    line, node = 1, data
    for part in loc:
        if isinstance(node, dict) and id(node) in line_map:
            start, keys = line_map[id(node)]
            line = keys.get(part, start)
        if isinstance(node, dict | list) and has(node, part):
            node = node[part]
        else:
            break
    return line


def has(node: dict | list, part: Any) -> bool:
    """Whether ``node[part]`` exists (a key of a mapping, an index of a list)."""
    return part in node if isinstance(node, dict) else isinstance(part, int) and part < len(node)


def inner_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside a field annotation (``X | None``, ``list[X]``, ...), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = inner_model(arg)
        if found is not None:
            return found
    return None


def model_at(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The schema model at a location under ``root`` (list indices skipped), for listing allowed keys."""
    model: type[BaseModel] | None = root
    for part in loc:
        if isinstance(part, int):
            continue
        if model is None or part not in model.model_fields:
            return None
        model = inner_model(model.model_fields[part].annotation)
    return model


def explain(error: dict, model: type[BaseModel] | None) -> str:
    """A pydantic error in our words (``model``: the schema where the error is, to list allowed keys)."""
    kind, msg = error["type"], error["msg"]
    if kind == "extra_forbidden":
        allowed = ", ".join(model.model_fields) if model else "see the schema"
        return f"unknown key; allowed keys here: {allowed}"
    if kind == "missing":
        return "required field is missing"
    return msg


def problems_of(
    err: ValidationError, file: str, data: Any, line_map: dict,
    model_at: Callable[[tuple], type[BaseModel] | None], clean: Callable[[tuple], tuple] = tuple,
    top: str = "(file)",
) -> list[str]:  # fmt: skip
    """Each pydantic error as ``file:line: field.path: message``. ``model_at(loc)`` is the schema at a
    location (to list allowed keys); ``clean`` rewrites a location (dropping discriminator tags)."""
    out = []
    for error in err.errors():
        loc = clean(tuple(error["loc"]))
        where = ".".join(str(p) for p in loc) or top
        out.append(f"{file}:{line_of(data, line_map, loc)}: {where}: {explain(error, model_at(loc[:-1]))}")
    return out
