"""Prefect tasks: evaluate a model directory (cached by model hash + input-file hashes + settings)
and race a candidate's decode speed against the base model's (never cached)."""
from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from frugalflow.errors import CorruptData
from frugalflow.evaluate.race import decode_race as race
from frugalflow.evaluate.suite import evaluate_model, evaluation_key
from frugalflow.integrity import quarantine, read_json_checked, write_json_checked
from frugalflow.pausepoints import pause_point
from frugalflow.progress import ProgressBar
from tasks.gpu_slot import gpu_slot


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
    if cache_file.is_file():  # checksummed and written atomically (frugalflow/integrity.py)
        try:
            metrics = read_json_checked(cache_file)
            logger.info("evaluate %s: cached result %s (checksum verified)", label, cache_file.name)
            return {**metrics, "cached": True}
        except CorruptData as exc:
            moved = quarantine(cache_file)
            logger.warning("evaluate %s: cache entry not reused: %s; moved to %s, recomputing", label, exc,
                           moved.name)

    bar = ProgressBar(f"evaluate {label}: windows")  # drawn only when stderr is a terminal

    def progress(done: int, total: int) -> None:
        pause_point(f"evaluate.{label}")
        bar(done, total)
        if done == total or done % max(1, total // 4) == 0:
            logger.info("evaluate %s: perplexity %d/%d windows", label, done, total)

    with gpu_slot(f"evaluate {label}"), bar:
        metrics = evaluate_model(Path(model_dir), Path(data_dir), evaluation, device=device, on_progress=progress,
                                 root=root_path)
    logger.info("evaluate %s: ppl %.3f, %.1f MB, decode %.1f tok/s (p50 %.1f ms, p95 %.1f ms), prefill %.0f tok/s, "
                "peak memory %.0f MB", label, metrics["ppl"], metrics["size_mb"], metrics["decode_tps"],
                metrics["latency_p50_ms"], metrics["latency_p95_ms"], metrics["prefill_tps"], metrics["peak_mem_mb"])
    extra = {k: v for k, v in metrics.items() if k.startswith(("ppl.", "lm_eval."))}
    if extra:
        logger.info("evaluate %s: %s", label, ", ".join(f"{k} {v:.4g}" for k, v in sorted(extra.items())))
    pause_point(f"evaluate.{label}.write")
    write_json_checked(cache_file, metrics)
    return {**metrics, "cached": False}


@task(name="decode-race")
def decode_race(base_dir: str, model_dir: str, evaluation, device: str, label: str) -> dict:
    """The candidate's and the base model's decode tokens/s, interleaved in this evaluation."""
    logger = get_run_logger()
    with gpu_slot(f"decode race {label}"):
        result = race(Path(base_dir), Path(model_dir), evaluation.prompt, evaluation.decode_race_rounds,
                      new_tokens=evaluation.decode_tokens, device=device)
    logger.info("decode race %s vs base model (%d interleaved rounds, medians): %.1f vs %.1f tok/s, %.2fx", label,
                result["decode_race_rounds"], result["decode_tps"], result["base_decode_tps"],
                result["decode_speedup"])
    return result
