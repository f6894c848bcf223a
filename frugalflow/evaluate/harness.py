"""Downstream accuracy through lm-evaluation-harness, on the model object already loaded.

The loaded model (dense, packed int4 or int8) is wrapped in lm-eval's HFLM as it is, so
the numbers are those of the model frugalflow stores, not of a reload by lm-eval. Tasks are
lm-eval names (its own tasks need their datasets, usually from the Hugging Face hub) or
tasks from `include_path`, a folder of task YAMLs such as `evals/lm_eval/` (offline: a
relative `dataset_kwargs.data_files` there is resolved against the YAML's folder; lm-eval
alone would resolve it against the working directory).

Metrics: `lm_eval.<task>.<metric>` with lm-eval's filter suffix dropped when it is `none`
(`acc,none` -> `acc`, `exact_match,strict-match` -> `exact_match.strict-match`), plus
`lm_eval.<task>.samples`, the number of documents scored. lm-eval is imported only here.
"""
from __future__ import annotations

import hashlib
import random
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from frugalflow.config import LMEvalConfig, RecipeError

IGNORED_PARTS = {"__pycache__", ".ipynb_checkpoints"}


def include_dir(cfg: LMEvalConfig, root: Path) -> Path | None:
    if cfg.include_path is None:
        return None
    path = Path(cfg.include_path)
    path = path if path.is_absolute() else Path(root) / path
    if not path.is_dir():
        raise RecipeError("evaluation", [f"evaluation.lm_eval.include_path: {cfg.include_path!r} is not a folder "
                                         f"(relative to {root})"])
    return path


def include_hash(cfg: LMEvalConfig, root: Path) -> str:
    """Hash of every file under include_path (names and contents) and lm-eval's version."""
    from importlib.metadata import PackageNotFoundError, version

    digest = hashlib.sha256()
    try:
        digest.update(version("lm_eval").encode())
    except PackageNotFoundError:
        digest.update(b"lm_eval missing")
    folder = include_dir(cfg, root)
    if folder is not None:
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and not IGNORED_PARTS & set(p.parts)):
            digest.update(str(path.relative_to(folder)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _absolute(files, base: Path):
    """data_files (str, list or split -> str/list) with relative paths made relative to base."""
    if isinstance(files, str):
        return files if Path(files).is_absolute() or "://" in files else str(base / files)
    if isinstance(files, list):
        return [_absolute(f, base) for f in files]
    if isinstance(files, dict):
        return {k: _absolute(v, base) for k, v in files.items()}
    return files


def task_specs(cfg: LMEvalConfig, root: Path):
    """(task specs for simple_evaluate, TaskManager): names, or full configs with absolute
    data_files for single tasks defined under include_path."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    folder = include_dir(cfg, root)
    manager = None
    if folder is not None:  # the local folder alone indexes fast; lm-eval's own tasks take seconds
        manager = TaskManager(include_path=str(folder), include_defaults=False)
        if any(name not in manager.task_index for name in cfg.tasks):
            manager = None
    if manager is None:
        manager = TaskManager(include_path=str(folder) if folder else None)
    unknown = [name for name in cfg.tasks if name not in manager.task_index]
    if unknown:
        where = f"lm-eval's tasks or {folder}" if folder else "lm-eval's tasks (set include_path for local ones)"
        raise RecipeError("evaluation", [f"evaluation.lm_eval.tasks: {name!r} is not in {where}" for name in unknown])
    specs = []
    for name in cfg.tasks:
        entry = manager.task_index[name]
        path = entry.yaml_path
        if entry.kind == Kind.TASK and path is not None and folder is not None and folder.resolve() in path.resolve().parents:
            spec = deepcopy(load_yaml(path, resolve_func=True))
            kwargs = spec.get("dataset_kwargs") or {}
            if "data_files" in kwargs:
                spec["dataset_kwargs"] = {**kwargs, "data_files": _absolute(kwargs["data_files"], path.parent)}
            for key in ("tag", "group"):
                spec.pop(key, None)
            specs.append(spec)
        else:
            specs.append(name)
    return specs, manager


def metric_name(task: str, key: str) -> str:
    metric, _, filt = key.partition(",")
    return f"lm_eval.{task}.{metric}" + (f".{filt}" if filt and filt != "none" else "")


def flatten_results(results: dict) -> dict[str, float]:
    """lm-eval's results dict -> {lm_eval.<task>.<metric>: value} (numbers only)."""
    out: dict[str, float] = {}
    for task, values in results.get("results", {}).items():
        for key, value in values.items():
            if key != "alias" and isinstance(value, (int, float)) and not isinstance(value, bool):
                out[metric_name(task, key)] = float(value)
    for task, counts in results.get("n-samples", {}).items():
        if isinstance(counts, dict) and "effective" in counts:
            out[f"lm_eval.{task}.samples"] = int(counts["effective"])
    return out


def run_lm_eval(model: nn.Module, tokenizer, cfg: LMEvalConfig, root: Path, seed: int = 0) -> dict[str, float]:
    """lm-eval's simple_evaluate on `model` under torch.inference_mode; flat metrics."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise RecipeError("evaluation", [f"evaluation.lm_eval: lm-eval is not installed ({exc}); "
                                         "pip install lm-eval==0.4.13 or set evaluation.lm_eval: null"]) from None
    specs, manager = task_specs(cfg, Path(root))
    was_training = model.training
    rng = random.getstate(), np.random.get_state(), torch.get_rng_state()  # lm-eval seeds them globally
    try:
        with torch.inference_mode():
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size)
            results = lm_eval.simple_evaluate(model=lm, tasks=specs, num_fewshot=cfg.num_fewshot, limit=cfg.limit,
                                              task_manager=manager, log_samples=False, bootstrap_iters=1000,
                                              random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                              fewshot_random_seed=seed)
    finally:
        model.train(was_training)
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
    if results is None:
        raise RuntimeError("lm-eval returned no results")
    return flatten_results(results)
