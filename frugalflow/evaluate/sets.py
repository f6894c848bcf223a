"""Named perplexity sets: token windows from a prepared split or from local text files.

A set is either a split of the prepared data directory (`split: eval`) or text files
(`text_files: ["evals/notes/*.txt"]`, paths or glob patterns relative to the project root,
one document per file). Text files are read in sorted path order, joined with a blank line
as `prepare_data` joins documents, tokenized with the evaluated model's tokenizer and cut
into windows of `window` tokens (default: the prepared data's window, i.e. data.window).
Problems are raised as RecipeError naming the key, e.g. `evaluation.sets.notes.text_files`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from frugalflow.config import EvalSetConfig, RecipeError
from frugalflow.data import load_windows, to_windows
from frugalflow.input_files import matching_files


def project_root_of(data_dir: Path) -> Path:
    """The nearest folder at or above `data_dir` that holds dvc.yaml, else the working directory."""
    data_dir = Path(data_dir).resolve()
    for folder in (data_dir, *data_dir.parents):
        if (folder / "dvc.yaml").is_file():
            return folder
    return Path.cwd()


def resolve_files(name: str, patterns: list[str], root: Path) -> list[Path]:
    """Sorted, de-duplicated files the patterns name; every pattern must match a file."""
    found: set[Path] = set()
    problems = []
    for pattern in patterns:
        hits = matching_files(pattern, root)
        if not hits:
            problems.append(f"evaluation.sets.{name}.text_files: {pattern!r} matches no file "
                            f"(relative to {root})")
        found.update(hits)
    if problems:
        raise RecipeError("evaluation", problems)
    return sorted(found)


def data_window(data_dir: Path) -> int:
    manifest = Path(data_dir) / "manifest.json"
    try:
        return int(json.loads(manifest.read_text())["window"])
    except (OSError, ValueError, KeyError) as exc:
        raise RecipeError("evaluation", [f"{manifest}: cannot read the prepared window length ({exc}); "
                                         "run prepare_data or give the set a window"]) from None


def text_windows(name: str, files: list[Path], tokenizer, window: int, max_windows: int | None) -> torch.Tensor:
    """[n, window] windows from the files' text (documents joined with a blank line)."""
    text = "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    windows = to_windows(ids, window, max_windows or len(ids))
    if len(windows) == 0:
        raise RecipeError("evaluation", [f"evaluation.sets.{name}: {len(ids)} tokens in {len(files)} file(s), "
                                         f"fewer than one window of {window}; add text or lower its window"])
    return windows


def set_windows(name: str, spec: EvalSetConfig, data_dir: Path, tokenizer, root: Path) -> torch.Tensor:
    """The windows of one named set."""
    if spec.split is not None:
        try:
            windows = load_windows(data_dir, spec.split)
        except FileNotFoundError as exc:
            raise RecipeError("evaluation", [f"evaluation.sets.{name}.split: {exc}"]) from None
        if len(windows) == 0:
            raise RecipeError("evaluation", [f"evaluation.sets.{name}.split: the {spec.split} split is empty"])
        return windows[: spec.max_windows] if spec.max_windows else windows
    files = resolve_files(name, spec.text_files, root)
    return text_windows(name, files, tokenizer, spec.window or data_window(data_dir), spec.max_windows)


def every_set(sets: dict[str, EvalSetConfig], data_dir: Path, tokenizer, root: Path) -> dict[str, torch.Tensor]:
    """The prepared eval split as `eval`, then the windows of every named set: what the perplexity gate reads."""
    return {"eval": load_windows(data_dir, "eval"),
            **{name: set_windows(name, spec, data_dir, tokenizer, root) for name, spec in sets.items()}}


def set_inputs(name: str, spec: EvalSetConfig, data_dir: Path, root: Path) -> list[Path]:
    """The files a set's windows depend on (for the evaluation cache key)."""
    if spec.split is not None:
        return [Path(data_dir) / f"{spec.split}.safetensors"]
    files = resolve_files(name, spec.text_files, root)
    return files if spec.window else [*files, Path(data_dir) / "manifest.json"]
