"""Prefect task: evaluate a model directory, cached by model hash + data hash + settings."""
from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task

from frugalflow.evaluate.suite import evaluate_model, evaluation_key


@task(name="evaluate")
def evaluate(model_dir: str, data_dir: str, evaluation, cache_dir: str, device: str, label: str) -> dict:
    logger = get_run_logger()
    key = evaluation_key(Path(model_dir), Path(data_dir), evaluation, device)
    cache_file = Path(cache_dir) / "evaluations" / f"{key}.json"
    if cache_file.is_file():
        metrics = json.loads(cache_file.read_text())
        logger.info("evaluate %s: cached result %s", label, cache_file.name)
        return {**metrics, "cached": True}

    def progress(done: int, total: int) -> None:
        if done == total or done % max(1, total // 4) == 0:
            logger.info("evaluate %s: perplexity %d/%d windows", label, done, total)

    metrics = evaluate_model(Path(model_dir), Path(data_dir), evaluation, device=device, on_progress=progress)
    logger.info("evaluate %s: ppl %.3f, %.1f MB, %.1f tok/s", label, metrics["ppl"], metrics["size_mb"],
                metrics["decode_tps"])
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    cache_file.write_text(json.dumps(metrics, indent=1) + "\n")
    return {**metrics, "cached": False}
