"""Training recipes: one file each in ``recipes/`` (read and validated by ``tasks.train.recipe_files``) over
the typed schema of ``tasks.train.recipe_schema``. Callers import from here.

The paper's recipes carry its hyperparameters (arXiv 2312.16886 and the authors' scripts; see
``shared/reference/mobilevlm-facts.md``). ``tiny`` is ours: the same three stages on the tiny specs,
small enough for a 2-core CPU in a few minutes; ``tiny-v2`` extends it with the V2 projector (LDPv2).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tasks.train.recipe_files import RecipeError, load_recipe, load_recipes, recipe_files
from tasks.train.recipe_schema import (
    STAGE_ORDER,
    DatasetRef,
    LoraConfig,
    OptimConfig,
    Part,
    Recipe,
    StageConfig,
    StageName,
    stage_dict,
)

__all__ = [
    "STAGE_ORDER", "DatasetRef", "LoraConfig", "OptimConfig", "Part", "Recipe", "RecipeError", "StageConfig",
    "StageName", "get_recipe", "load_recipes", "recipe_files", "stage_dict",
]  # fmt: skip


def get_recipe(name: str, **stage_overrides: dict[str, Any]) -> Recipe:
    """The recipe ``name`` (its file, bases resolved); ``stage_overrides`` maps a stage name to field
    overrides. An unknown name raises KeyError listing the known recipes."""
    files = recipe_files()
    if name not in files:
        raise KeyError(f"unknown recipe {name!r}; known recipes: {', '.join(sorted(files))}")
    recipe = load_recipe(name, files)
    if not stage_overrides:
        return recipe
    stages = tuple(dataclasses.replace(s, **stage_overrides.get(s.name, {})) for s in recipe.stages)
    return dataclasses.replace(recipe, stages=stages)
