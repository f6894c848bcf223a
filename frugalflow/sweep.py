"""Sweep grids: `KEY=V1,V2` options and recipe `sweep.grid` mappings into candidate overrides.

`expand_grid({"stages.0.sparsity": [0.1, 0.3], "stages.1.bits": [4, 8]})` gives the four
assignments in row-major order; `as_overrides` turns one into `KEY=VALUE` strings that the
recipe loader applies and validates like any other override.
"""
from __future__ import annotations

import itertools
import json
from typing import Any

from frugalflow.config import RecipeError
from frugalflow.recipe_io import parse_scalar


def parse_grid_option(text: str) -> tuple[str, list[Any]]:
    """`stages.0.sparsity=0.1,0.3` -> ("stages.0.sparsity", [0.1, 0.3]); values are YAML scalars (`2:4` stays a string)."""
    key, sep, raw = text.partition("=")
    values = [v.strip() for v in raw.split(",") if v.strip()] if sep else []
    if not key.strip() or not values:
        raise RecipeError("sweep", [f"{text!r}: expected KEY=V1,V2,..., e.g. stages.0.sparsity=0.1,0.3"])
    return key.strip(), [parse_scalar(v) for v in values]


def expand_grid(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, the last key varying fastest."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def as_overrides(assignment: dict[str, Any]) -> list[str]:
    return [f"{key}={json.dumps(value)}" for key, value in assignment.items()]


def label(assignment: dict[str, Any]) -> str:
    """A short readable name: the last part of each key with its value, e.g. `sparsity=0.3,bits=8`."""
    return ",".join(f"{key.split('.')[-1]}={value}" for key, value in assignment.items()) or "base"
