"""The one recipe loader of `frugalflow run`, `sweep`, `schedule` and `validate`: whatever a run
would refuse before heavy work is refused here, so `validate` refuses exactly the same.

`load_run_recipe(path, overrides)`: read the file, take `base_model` and `data` from the
project's params.yaml (the DVC stages read them there; a recipe file may omit them but not
contradict them, nor may overrides), apply the overrides, validate, then check what the schema
cannot see: stages that cannot chain, and the local inputs the run will read (the base model
directory and its architecture, the corpus files, named evaluation sets, lm-eval tasks, the
device). Every problem is one line of a RecipeError (exit code 2).
"""
from __future__ import annotations

import json
from pathlib import Path

from frugalflow.config import Recipe, RecipeError
from frugalflow.recipe_io import apply_override, matching_files, parse_override, read_yaml, recipe_from_dict

DVC_OWNED = ("base_model", "data")  # read by the DVC stages straight from params.yaml


def find_project_root(params_path: Path) -> Path | None:
    """The nearest folder at or above the recipe file that holds dvc.yaml, or None."""
    for folder in (params_path.parent, *params_path.parents):
        if (folder / "dvc.yaml").is_file():
            return folder
    return None


def merged_recipe(params_path: Path, root: Path | None, overrides: list[str]) -> Recipe:
    """The recipe with the DVC-owned sections from the project's params.yaml, overrides applied."""
    bad = [o for o in overrides if o.split("=", 1)[0].split(".")[0].strip() in DVC_OWNED]
    if bad:
        raise RecipeError("override", [f"{o}: {', '.join(DVC_OWNED)} are read by the DVC stages from "
                                       "params.yaml; edit the file instead of overriding" for o in bad])
    data = read_yaml(params_path)
    dvc_params = root / "params.yaml" if root is not None else None
    if isinstance(data, dict) and dvc_params is not None and params_path != dvc_params and dvc_params.is_file():
        shared = read_yaml(dvc_params)
        if not isinstance(shared, dict):
            raise RecipeError(str(dvc_params), ["(top level): expected a mapping of keys"])
        for key in DVC_OWNED:
            if key in data and data[key] != shared.get(key):
                raise RecipeError(str(params_path), [f"{key}: differs from {dvc_params}, which the DVC stages "
                                                     "read; remove it from the recipe or edit params.yaml"])
            if key in shared:
                data[key] = shared[key]
    for text in overrides:
        if not isinstance(data, dict):
            break  # recipe_from_dict names the real problem
        apply_override(data, *parse_override(text))
    return recipe_from_dict(data, str(params_path))


def chain_problems(recipe: Recipe) -> list[str]:
    """Stage orders whose later stage would silently drop what an earlier one did."""
    problems = []
    kinds = [s.kind for s in recipe.stages]
    for i, stage in enumerate(recipe.stages):
        earlier = recipe.stages[:i]
        if stage.kind == "prune" and "quantize" in kinds[:i]:
            q = next(s for s in earlier if s.kind == "quantize")
            problems.append(f"stages.{i}.method: {stage.method} (prune) after {q.method} (quantize) would save "
                            "the quantized weights dense; put prune before quantize (given order: "
                            f"{' -> '.join(s.method for s in recipe.stages)})")
        if stage.kind == "distill" and any(s.method in ("dynamic_int8", "static_int8") for s in earlier):
            problems.append(f"stages.{i}.method: {stage.method} after an int8 stage trains float weights and "
                            "drops the int8 quantization; put the int8 stage after distillation")
    return problems


def _rel(root: Path, name: str) -> Path:
    return Path(name) if Path(name).is_absolute() else root / name


def input_problems(recipe: Recipe, root: Path) -> list[str]:
    """The local files and devices the run will read, checked without loading anything heavy."""
    problems = []
    base = recipe.base_model
    if base.source == "local":
        src = _rel(root, base.local_dir)
        config = src / "config.json"
        if not config.is_file():
            problems.append(f"base_model.local_dir: {src} is not a Hugging Face model directory (no config.json)")
        else:
            try:
                model_type = json.loads(config.read_text()).get("model_type")
            except (ValueError, OSError, AttributeError) as exc:
                problems.append(f"base_model.local_dir: {config} is not readable JSON ({exc})")
            else:
                from frugalflow.arch import ARCHS

                if model_type not in ARCHS:
                    problems.append(f"base_model.local_dir: model_type {model_type!r} in {config} is not "
                                    f"supported; supported: {', '.join(sorted(ARCHS))}")
    if recipe.data.corpus == "text_files":
        chars = 0
        for name in recipe.data.text_files:
            path = _rel(root, name)
            if not path.is_file():
                problems.append(f"data.text_files: {path} does not exist")
                continue
            try:
                chars += len(path.read_text(encoding="utf-8", errors="replace").strip())
            except OSError as exc:
                problems.append(f"data.text_files: {path} is not readable ({exc.strerror})")
        if chars == 0 and not problems:
            problems.append(f"data.text_files: the corpus is empty (no text in {len(recipe.data.text_files)} "
                            "file(s)); add text")
    sources = [(f"data.calib_mix.{name}", mix.text_files) for name, mix in recipe.data.calib_mix.items()]
    sources += [(f"evaluation.sets.{name}", spec.text_files or []) for name, spec in recipe.evaluation.sets.items()]
    for key, patterns in sources:
        for pattern in patterns:
            if not matching_files(pattern, root):
                problems.append(f"{key}.text_files: {pattern!r} matches no file (relative to {root})")
    lm = recipe.evaluation.lm_eval
    if lm is not None and lm.include_path and not _rel(root, lm.include_path).is_dir():
        problems.append(f"evaluation.lm_eval.include_path: {_rel(root, lm.include_path)} is not a folder")
    if recipe.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            problems.append("device: 'cuda' asked for but no CUDA device is available here; use auto or cpu")
    return problems


def load_run_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *,
                    require_project: bool = True) -> tuple[Recipe, Path | None]:
    """(recipe, project root) as a run sees them; RecipeError listing every problem otherwise.
    `require_project`: a run needs the folder with dvc.yaml; `validate` checks a lone file too."""
    params_path = Path(path).resolve()
    if not params_path.is_file():
        raise RecipeError(str(path), [f"file not found: {path}" if not params_path.exists()
                                      else f"{path} is not a file"])
    root = find_project_root(params_path)
    if root is None and require_project:
        raise RecipeError(str(path), [f"no dvc.yaml at or above {params_path.parent}: run from a frugalflow "
                                      "project (the folder with dvc.yaml and params.yaml)"])
    recipe = merged_recipe(params_path, root, list(overrides))
    problems = chain_problems(recipe) + input_problems(recipe, root or params_path.parent)
    if problems:
        raise RecipeError(str(path), problems)
    return recipe, root
