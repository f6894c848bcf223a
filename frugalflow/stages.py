"""Run one compression stage: model directory in -> model directory out + stats.

`run_stage` calls the entry the stage's config class names (frugalflow/method.py); every entry
loads its input, compresses, and saves a directory that `models.load_model` reads back. Stats
are plain JSON-able dicts (per-layer figures under "layers"); the method's search result is
written under `search/` in the output and listed in stats["search"]. Progress and per-step
metrics go through the `report` callback.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from frugalflow import config as C
from frugalflow.data import load_windows
from frugalflow.method import entry_for, quiet, write_search
from frugalflow.models import load_model, model_stats

Report = Callable[[str, dict], None]  # (message, metrics) -> None


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was asked for but no CUDA device is available; use auto or cpu")
    return device


def run_stage(stage, model_dir: str | Path, out_dir: str | Path, *, data_dir: str | Path,
              teacher_dir: str | Path, device: str = "cpu", seed: int = 0,
              checkpoint_dir: str | Path | None = None, pruned: bool = False, report: Report = quiet,
              progress: Callable[[int, int], None] | None = None) -> dict:
    """Compress `model_dir` into `out_dir` with one stage config; returns the stage's stats.

    `pruned`: an earlier stage pruned the model, so its zeros are a mask to keep. `report(message,
    metrics)` gets the stage's progress lines; `progress(done, total)` its layers or steps (a bar)."""
    if not hasattr(type(stage), "entry"):
        raise ValueError(f"unknown method {getattr(stage, 'method', stage)!r}; allowed: {', '.join(C.METHODS)}")
    runner = entry_for(stage)
    torch.manual_seed(seed)
    ctx = {"device": resolve_device(device), "data_dir": Path(data_dir), "teacher_dir": Path(teacher_dir),
           "seed": seed, "checkpoint_dir": checkpoint_dir, "pruned": pruned, "report": report,
           "progress": progress, "calib": lambda: load_windows(data_dir, "calib")}
    started = time.perf_counter()
    result = runner(stage, Path(model_dir), Path(out_dir), ctx)
    stats = result.stats
    searched = write_search(Path(out_dir), result.search)
    if searched:
        stats["search"] = searched
    stats["seconds"] = time.perf_counter() - started
    stats.update(model_stats(load_model(out_dir, device="cpu")))
    return stats
