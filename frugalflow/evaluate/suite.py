"""The evaluation every candidate gets: perplexity, size on disk, decode speed, model stats.

`evaluation_key` names a result by the model's weight-file hashes, the evaluation data
and the settings, so callers can cache it (a baseline is not recomputed every night).
"""
from __future__ import annotations

import hashlib
import platform
from pathlib import Path

import torch

from frugalflow.config import EvaluationConfig, fingerprint
from frugalflow.data import load_windows
from frugalflow.evaluate.perplexity import perplexity
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


def evaluation_key(model_dir: Path, data_dir: Path, cfg: EvaluationConfig, device: str) -> str:
    model_hash = hash_files([p for p in Path(model_dir).iterdir() if p.suffix in (".safetensors", ".json")])
    data_hash = hash_files([Path(data_dir) / "eval.safetensors"])
    machine = f"{platform.node()}|{platform.machine()}|{torch.get_num_threads()}|{device}"
    return fingerprint(model_hash, data_hash, cfg, machine)


def evaluate_model(model_dir: Path, data_dir: Path, cfg: EvaluationConfig, device: str = "cpu",
                   on_progress=None) -> dict:
    model_dir, data_dir = Path(model_dir), Path(data_dir)
    windows = load_windows(data_dir, "eval")
    if cfg.max_eval_windows:
        windows = windows[: cfg.max_eval_windows]
    model = load_model(model_dir, device=device)
    tokenizer = load_tokenizer(model_dir)
    metrics = {"ppl": perplexity(model, windows, on_progress=on_progress), "eval_windows": len(windows),
               "size_mb": weights_size_mb(model_dir)}
    metrics.update(decode_speed(model, tokenizer, cfg.prompt, new_tokens=cfg.decode_tokens,
                                repeats=cfg.decode_repeats))
    metrics.update({k: v for k, v in model_stats(model).items() if isinstance(v, (int, float))})
    return metrics
