"""What a run refuses beyond the schema, before heavy work: stages that cannot chain, and the
local inputs the run will read (the base model directory and its architecture, the corpus files,
named evaluation sets, lm-eval tasks, the device). Each problem is one line.

`recipe_io.load_recipe(..., checks="file" | "run")` runs these for `validate`, `run`, `sweep`,
`schedule` and the flows, so `validate` refuses exactly what a run would.
"""
from __future__ import annotations

import json
from pathlib import Path

from frugalflow.config import Recipe
from frugalflow.input_files import matching_files


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
