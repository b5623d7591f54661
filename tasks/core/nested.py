"""Nested dicts as flat ``a.b.c`` keys: MLflow params and metrics, DeepSpeed placeholders."""

from __future__ import annotations

from typing import Any


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; an empty dict is a leaf of its own."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def numbers(data: dict[str, Any]) -> dict[str, float]:
    """The numeric leaves of ``data`` as floats (booleans, strings and lists left out)."""
    return {
        k: float(v)
        for k, v in flatten(data).items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
