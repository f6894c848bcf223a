"""Reading a recipe: `params.yaml` -> command-line overrides -> validated `Recipe`, and back to flat params.

`load_recipe(path, overrides)` is the one entry point. Validation errors become a
`RecipeError` with one line per problem: key path, value given, what is allowed.
"""
from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from frugalflow.config import METHODS, Recipe, RecipeError
from frugalflow.redact import redact


def _describe(err: dict) -> str:
    parts = [p for i, p in enumerate(err["loc"])
             if not (i >= 2 and err["loc"][i - 2] == "stages" and p in METHODS)]  # drop union tags
    loc = ".".join(str(p) for p in parts) or "(top level)"
    value = err.get("input")
    if err["type"] == "union_tag_invalid":
        value = err.get("ctx", {}).get("tag")
    try:
        shown = json.dumps(value, default=str) if not isinstance(value, dict) else "{...}"
    except (ValueError, TypeError, RecursionError):  # e.g. a YAML alias that contains itself
        shown = f"<{type(value).__name__}>"
    if len(shown) > 60:
        shown = shown[:57] + "..."
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key (not part of the recipe schema)"
    elif err["type"] == "union_tag_invalid":
        tags = err.get("ctx", {}).get("expected_tags", "")
        msg = f"unknown method; allowed: {tags}"
    elif err["type"] == "union_tag_not_found":
        msg = "missing 'method'; allowed: " + ", ".join(repr(m) for m in METHODS)
    return f"{loc}: {msg} (given: {shown})"


def parse_scalar(raw: str) -> Any:
    """A command-line value as YAML reads it, except that `2:4` stays the string "2:4"
    (YAML 1.1 would read it as the base-60 integer 124)."""
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise RecipeError("override", [f"{raw!r}: not a YAML value ({getattr(exc, 'problem', None) or exc}); "
                                       "quote strings that contain YAML syntax"]) from None
    except RecursionError:
        raise RecipeError("override", [f"{raw[:40]!r}: nested too deeply"]) from None
    return raw.strip() if isinstance(value, int) and ":" in raw else value


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.0.c=value` -> (['a','b','0','c'], parsed value)."""
    if "=" not in text:
        raise RecipeError("override", [f"{text!r}: expected KEY=VALUE, e.g. stages.0.sparsity=0.3"])
    key, raw = text.split("=", 1)
    return key.strip().split("."), parse_scalar(raw)


def apply_override(data: dict, path: list[str], value: Any) -> None:
    def not_a_section(upto: int, node: Any) -> RecipeError:
        return RecipeError("override", [f"{'.'.join(path)}: {'.'.join(path[:upto])} holds a value "
                                        f"({json.dumps(node, default=str)[:40]}), not a section with keys"])

    node: Any = data
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError("override", [f"{'.'.join(path)}: {'.'.join(path[:i + 1])} is not an index "
                                               f"of a list of {len(node)}"])
            node = node[int(part)]
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            raise not_a_section(i, node)
    if not isinstance(node, (dict, list)):
        raise not_a_section(len(path) - 1, node)
    last = path[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise RecipeError("override", [f"{'.'.join(path)}: no such list index"])
        node[int(last)] = value
    else:
        node[last] = value


def recipe_from_dict(data: Any, source: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(source, [f"(top level): expected a mapping of keys, got {type(data).__name__}"])
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(source, [_describe(e) for e in exc.errors()]) from None


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(str(path), [f"file not found: {path}"])
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise RecipeError(str(path), [f"not UTF-8 text (byte {exc.start}: {exc.reason})"]) from None
    except OSError as exc:
        raise RecipeError(str(path), [f"cannot read the file: {exc.strerror or exc}"]) from None
    except RecursionError:
        raise RecipeError(str(path), ["nested too deeply to be a recipe"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise RecipeError(str(path), [f"{where}not valid YAML ({getattr(exc, 'problem', exc)})"]) from None
    return data if data is not None else {}


def load_recipe(path: str | Path = "params.yaml", overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe; raises RecipeError listing every problem."""
    data = read_yaml(path)
    for text in overrides:
        if isinstance(data, dict):
            apply_override(data, *parse_override(text))
    return recipe_from_dict(data, str(path))


def flatten(recipe: Recipe) -> dict[str, str]:
    """The recipe as flat `a.b.c -> value` strings, for MLflow params (URL passwords redacted)."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for i, v in enumerate(value):
                walk(f"{prefix}.{i}", v)
        else:
            out[prefix] = redact(json.dumps(value) if isinstance(value, list) else str(value))

    walk("", recipe.model_dump(mode="json"))
    return out


def matching_files(pattern: str, root: str | Path = ".") -> list[Path]:
    """The files a recipe's path or glob pattern names (relative to `root` unless absolute; ** recurses)."""
    full = pattern if Path(pattern).is_absolute() else str(Path(root) / pattern)
    return [Path(p) for p in glob.glob(full, recursive=True) if Path(p).is_file()]
