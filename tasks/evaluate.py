"""Prefect task: evaluate a model directory, cached by model hash + input-file hashes + settings."""
from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task

from frugalflow.evaluate.suite import evaluate_model, evaluation_key


@task(name="evaluate")
def evaluate(model_dir: str, data_dir: str, evaluation, cache_dir: str, device: str, label: str,
             root: str | None = None) -> dict:
    """`root`: the project root that relative paths in `evaluation` (named sets' text files,
    lm-eval's include_path) are resolved against; default: the nearest folder at or above
    `data_dir` holding dvc.yaml."""
    logger = get_run_logger()
    root_path = Path(root) if root else None
    key = evaluation_key(Path(model_dir), Path(data_dir), evaluation, device, root=root_path)
    cache_file = Path(cache_dir) / "evaluations" / f"{key}.json"
    if cache_file.is_file():
        metrics = json.loads(cache_file.read_text())
        logger.info("evaluate %s: cached result %s", label, cache_file.name)
        return {**metrics, "cached": True}

    def progress(done: int, total: int) -> None:
        if done == total or done % max(1, total // 4) == 0:
            logger.info("evaluate %s: perplexity %d/%d windows", label, done, total)

    metrics = evaluate_model(Path(model_dir), Path(data_dir), evaluation, device=device, on_progress=progress,
                             root=root_path)
    logger.info("evaluate %s: ppl %.3f, %.1f MB, decode %.1f tok/s (p50 %.1f ms, p95 %.1f ms), prefill %.0f tok/s, "
                "peak memory %.0f MB", label, metrics["ppl"], metrics["size_mb"], metrics["decode_tps"],
                metrics["latency_p50_ms"], metrics["latency_p95_ms"], metrics["prefill_tps"], metrics["peak_mem_mb"])
    extra = {k: v for k, v in metrics.items() if k.startswith(("ppl.", "lm_eval."))}
    if extra:
        logger.info("evaluate %s: %s", label, ", ".join(f"{k} {v:.4g}" for k, v in sorted(extra.items())))
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    cache_file.write_text(json.dumps(metrics, indent=1) + "\n")
    return {**metrics, "cached": False}
