"""Reading a recipe: `params.yaml` -> command-line overrides -> validated `Recipe`, and back to flat params.

`load_recipe(source, overrides, checks=...)` is the one recipe loader: every command, the DVC
stages and the flows call it; `checks` says how much beyond the schema it checks (the same for
`validate`, `run`, `sweep` and `schedule`). A `RecipeSource` is a file read once, so a sweep
validates its candidates without reading the file again. The YAML reader refuses a key given
twice (PyYAML would keep the later one silently). Every problem is one line of a `RecipeError`
(exit code 2): key path, value given, what is allowed.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer

from frugalflow.config import METHODS, Recipe, RecipeError
from frugalflow.preflight import chain_problems, input_problems
from frugalflow.redact import redact

DVC_OWNED = ("base_model", "data")  # read by the DVC stages straight from params.yaml
MERGE_TAG = "tag:yaml.org,2002:merge"
Checks = Literal["schema", "file", "run"]


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


def _duplicate_keys(loader: yaml.SafeLoader, node: yaml.Node, path: tuple[str, ...], seen: set[int]) -> list[str]:
    """One line per key given twice in one mapping of the node tree (keys brought in by `<<:` merges may be
    overridden: they are not duplicates)."""
    if id(node) in seen:  # an alias: checked where it was defined
        return []
    seen.add(id(node))
    problems: list[str] = []
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            problems += _duplicate_keys(loader, item, (*path, str(i)), seen)
    elif isinstance(node, yaml.MappingNode):
        first: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == MERGE_TAG:
                problems += _duplicate_keys(loader, value_node, path, seen)
                continue
            key = loader.construct_object(key_node, deep=True) if isinstance(key_node, yaml.ScalarNode) else None
            line = key_node.start_mark.line + 1
            try:
                if key is not None and key in first:
                    problems.append(f"{'.'.join((*path, str(key)))}: key given twice (lines {first[key]} and {line}); "
                                    "YAML would keep only the later one silently: remove one")
                elif key is not None:
                    first[key] = line
            except TypeError:  # an unhashable key: the constructor reports it
                pass
            problems += _duplicate_keys(loader, value_node, (*path, str(key)), seen)
    return problems


def parse_yaml(text: str, source: str, at: tuple[str, ...] = ()) -> Any:
    """YAML as `yaml.safe_load` reads it, except that a key given twice in one mapping is a RecipeError
    naming the key path (below `at`) and both lines; syntax errors stay yaml.YAMLError."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        problems = _duplicate_keys(loader, node, at, set())
        if problems:
            raise RecipeError(source, problems)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def parse_scalar(raw: str, key: str = "") -> Any:
    """A command-line value as YAML reads it, except that `2:4` stays the string "2:4"
    (YAML 1.1 would read it as the base-60 integer 124)."""
    try:
        value = parse_yaml(raw, "override", tuple(key.split(".")) if key else ()) if raw.strip() else None
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
    return key.strip().split("."), parse_scalar(raw, key.strip())


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


def read_yaml(path: str | Path) -> Any:
    """The file's YAML (parse_yaml: a duplicate key is refused); `{}` for an empty file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(str(path), [f"file not found: {path}"])
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"), str(path))
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


def find_project_root(params_path: Path) -> Path | None:
    """The nearest folder at or above the recipe file that holds dvc.yaml, or None."""
    for folder in (params_path.parent, *params_path.parents):
        if (folder / "dvc.yaml").is_file():
            return folder
    return None


class RecipeSource(BaseModel):
    """A recipe file read once: its path, its project (the nearest folder with dvc.yaml; None for a
    lone file), what YAML made of it and, when the recipe is not the project's params.yaml, that
    file's content (the DVC stages read `base_model` and `data` there). `load_recipe` validates it
    with any overrides without reading it again. Serialized (a flow run's parameters) it is its
    path alone: the content, secrets included, stays in this process."""

    model_config = ConfigDict(frozen=True)
    path: Path
    root: Path | None = None
    data: Any = Field(None, repr=False)
    shared: dict | None = Field(None, repr=False)

    @model_serializer
    def _path_only(self) -> dict:
        return {"path": str(self.path)}

    @classmethod
    def read(cls, path: str | Path, *, with_project: bool = True) -> RecipeSource:
        """Read the file (and, with `with_project`, the project's params.yaml when it is another file)."""
        params_path = Path(path).resolve()
        if not params_path.is_file():
            raise RecipeError(str(path), [f"file not found: {path}" if not params_path.exists()
                                          else f"{path} is not a file"])
        root = find_project_root(params_path)
        data = read_yaml(params_path)
        dvc_params = root / "params.yaml" if root is not None else None
        shared = None
        if with_project and isinstance(data, dict) and dvc_params not in (None, params_path) and dvc_params.is_file():
            shared = read_yaml(dvc_params)
            if not isinstance(shared, dict):
                raise RecipeError(str(dvc_params), ["(top level): expected a mapping of keys"])
        return cls(path=params_path, root=root, data=data, shared=shared)


def _take_dvc_owned(source: RecipeSource, data: dict, overrides: list[str]) -> None:
    """`base_model` and `data` as the DVC stages read them: from the project's params.yaml; a recipe file may
    omit them but not contradict them, nor may overrides."""
    bad = [o for o in overrides if o.split("=", 1)[0].split(".")[0].strip() in DVC_OWNED]
    if bad:
        raise RecipeError("override", [f"{o}: {', '.join(DVC_OWNED)} are read by the DVC stages from "
                                       "params.yaml; edit the file instead of overriding" for o in bad])
    if source.shared is None:
        return
    for key in DVC_OWNED:
        if key in data and data[key] != source.shared.get(key):
            raise RecipeError(str(source.path), [f"{key}: differs from {source.root / 'params.yaml'}, which the DVC "
                                                 "stages read; remove it from the recipe or edit params.yaml"])
        if key in source.shared:
            data[key] = source.shared[key]


def load_recipe(source: str | Path | RecipeSource = "params.yaml", overrides: list[str] | tuple[str, ...] = (), *,
                checks: Checks = "schema") -> Recipe:
    """The recipe: read (unless `source` was read already), override, validate; RecipeError listing every problem.

    checks="schema": the file and the overrides against the schema, schedule (cron, time zone) included:
        commands that only read the tracking store, the DVC stages, benchmarks;
    checks="file": also all a run refuses before heavy work: `base_model`/`data` from the project's
        params.yaml, stages that cannot chain, the local inputs and the device (frugalflow/preflight.py),
        with or without a project around the file: `validate`;
    checks="run": the same, in a project (a folder with dvc.yaml): `run`, `sweep`, `schedule`, the flows.
    """
    if checks not in ("schema", "file", "run"):
        raise ValueError(f"checks={checks!r}: expected 'schema', 'file' or 'run'")
    if not isinstance(source, RecipeSource):
        source = RecipeSource.read(source, with_project=checks != "schema")
    if checks == "run" and source.root is None:
        raise RecipeError(str(source.path), [f"no dvc.yaml at or above {source.path.parent}: run from a frugalflow "
                                             "project (the folder with dvc.yaml and params.yaml)"])
    data = copy.deepcopy(source.data)  # a source is validated with many overrides (a sweep's candidates)
    overrides = list(overrides)
    if checks != "schema" and isinstance(data, dict):
        _take_dvc_owned(source, data, overrides)
    for text in overrides:
        if not isinstance(data, dict):
            break  # recipe_from_dict names the real problem
        apply_override(data, *parse_override(text))
    recipe = recipe_from_dict(data, str(source.path))
    if checks != "schema":
        problems = chain_problems(recipe) + input_problems(recipe, source.root or source.path.parent)
        if problems:
            raise RecipeError(str(source.path), problems)
    return recipe


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
