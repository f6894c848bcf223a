"""The evaluation every candidate gets: perplexity on the primary and named sets, size on disk,
prefill/decode speed and memory, model stats, and optionally lm-evaluation-harness accuracy.

Metrics: `ppl` on the prepared `eval` split (the primary set), `ppl.<name>` and
`windows.<name>` per named set of `evaluation.sets`, `lm_eval.<task>.<metric>` when
`evaluation.lm_eval` is set. `evaluation_key` names a result by the model's weight-file
hashes, every input file of the evaluation (the eval split, each named set's files,
lm-eval's task folder) and the settings, so callers can cache it (a baseline is not
recomputed every night). Relative paths in the settings are resolved against `root`, by
default the project root (the nearest folder at or above the data directory with dvc.yaml).
"""
from __future__ import annotations

import hashlib
import platform
from pathlib import Path

import torch

from frugalflow.code_hash import code_hash
from frugalflow.config import EvaluationConfig, fingerprint
from frugalflow.data import load_windows
from frugalflow.evaluate.harness import include_hash, run_lm_eval
from frugalflow.evaluate.perplexity import perplexity
from frugalflow.evaluate.sets import project_root_of, set_inputs, set_windows
from frugalflow.evaluate.speed import decode_speed
from frugalflow.models import load_model, load_tokenizer, model_stats, weights_size_mb


def hash_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def evaluation_key(model_dir: Path, data_dir: Path, cfg: EvaluationConfig, device: str,
                   root: Path | None = None) -> str:
    root = Path(root) if root is not None else project_root_of(Path(data_dir))
    model_hash = hash_files([p for p in Path(model_dir).iterdir() if p.suffix in (".safetensors", ".json")])
    data_hash = hash_files([Path(data_dir) / "eval.safetensors"])
    sets_hash = {name: hash_files(set_inputs(name, spec, Path(data_dir), root)) for name, spec in cfg.sets.items()}
    lm_eval_hash = include_hash(cfg.lm_eval, root) if cfg.lm_eval is not None else None
    machine = f"{platform.node()}|{platform.machine()}|{torch.get_num_threads()}|{device}"
    settings = cfg.model_dump(mode="json", exclude={"decode_race_rounds"})  # the race is never cached
    code = code_hash(__name__)  # this module and what it imports: an edit of the evaluation recomputes
    return fingerprint(model_hash, data_hash, settings, machine, sets_hash, lm_eval_hash, code)


def evaluate_model(model_dir: Path, data_dir: Path, cfg: EvaluationConfig, device: str = "cpu",
                   on_progress=None, root: Path | None = None) -> dict:
    model_dir, data_dir = Path(model_dir), Path(data_dir)
    root = Path(root) if root is not None else project_root_of(data_dir)
    windows = load_windows(data_dir, "eval")
    if cfg.max_eval_windows:
        windows = windows[: cfg.max_eval_windows]
    model = load_model(model_dir, device=device)
    tokenizer = load_tokenizer(model_dir)
    named = {name: set_windows(name, spec, data_dir, tokenizer, root) for name, spec in cfg.sets.items()}
    metrics = {"ppl": perplexity(model, windows, on_progress=on_progress), "eval_windows": len(windows),
               "size_mb": weights_size_mb(model_dir)}
    for name, set_w in named.items():
        metrics[f"ppl.{name}"] = perplexity(model, set_w)
        metrics[f"windows.{name}"] = len(set_w)
    metrics.update(decode_speed(model, tokenizer, cfg.prompt, new_tokens=cfg.decode_tokens,
                                repeats=cfg.decode_repeats, prefill_tokens=cfg.prefill_tokens))
    metrics.update({k: v for k, v in model_stats(model).items() if isinstance(v, (int, float))})
    if cfg.lm_eval is not None:  # last: lm-eval may give the tokenizer a pad token
        metrics.update(run_lm_eval(model, tokenizer, cfg.lm_eval, root))
    return metrics
