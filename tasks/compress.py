"""Prefect task: one compression stage as one MLflow child run.

The output directory is named by a content key (input model key + stage config +
data key + library source hash), so running again with unchanged inputs reuses the finished directory
instead of recomputing it. A stage writes `stats.json` last: a directory without it
is unfinished work and is redone.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import threading
from pathlib import Path

from filelock import FileLock
from prefect import get_run_logger, task

from frugalflow.config import fingerprint
from frugalflow.stages import run_stage
from tasks import tracking as T

# transformers builds modules under process-wide patches (meta-device init), so two stages in
# threads of one process corrupt each other's parameters: in one process stages compute one at
# a time. The sweep flow runs candidates in worker processes (flows/sweep.py) for parallel compute.
_COMPUTE = threading.Lock()
SUMMARY_KEYS = ("seconds", "sparsity", "bits_per_weight", "n_params", "final_loss", "seconds_per_step", "steps",
                "ppl_before", "ppl_after")


def library_hash() -> str:
    """Content hash of the compression library's source: new code never reuses old outputs."""
    import frugalflow

    digest = hashlib.sha256()
    for path in sorted(Path(frugalflow.__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def stage_key(input_key: str, stage, data_key: str) -> str:
    return fingerprint(input_key, stage, data_key, library_hash())


@task(name="compress-stage")
def compress_stage(stage, index: int, input_dir: str, input_key: str, *, data_dir: str, data_key: str,
                   teacher_dir: str, artifacts_dir: str, device: str, seed: int, pruned: bool,
                   tracking: T.Tracking) -> dict:
    logger = get_run_logger()
    key = stage_key(input_key, stage, data_key)
    out_dir = Path(artifacts_dir) / "stages" / f"{index}-{stage.method}-{key}"
    client = T.connect(tracking.uri)
    run_id = T.start_run(client, tracking.experiment_id, f"{index}-{stage.kind}-{stage.method}",
                         parent_run_id=tracking.parent_run_id,
                         tags={"frugalflow.stage": stage.kind, "frugalflow.method": stage.method,
                               "frugalflow.input_key": input_key, "frugalflow.key": key})
    T.log_params(client, run_id, {f"stage.{k}": v for k, v in stage.model_dump(mode="json").items()})
    stats_file = out_dir / "stats.json"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out_dir) + ".lock")  # two sweep candidates sharing this stage compute it once
    try:
        lock.acquire()
        cached = stats_file.is_file()
        if cached:
            logger.info("stage %d %s: reusing %s (inputs unchanged)", index, stage.method, out_dir)
            stats = json.loads(stats_file.read_text())
        else:
            logger.info("stage %d %s: compressing %s -> %s", index, stage.method, input_dir, out_dir)
            shutil.rmtree(out_dir, ignore_errors=True)  # unfinished earlier attempt

            def report(message: str, metrics: dict) -> None:
                logger.info("stage %d %s: %s", index, stage.method, message)
                step = int(metrics.pop("step", 0))
                T.log_metrics(client, run_id, metrics, step=step)

            with _COMPUTE:
                stats = run_stage(stage, input_dir, out_dir, data_dir=data_dir, teacher_dir=teacher_dir,
                                  device=device, seed=seed, checkpoint_dir=str(out_dir) + ".ckpt", pruned=pruned,
                                  report=report)
            stats_file.write_text(json.dumps(stats, indent=1, default=float) + "\n")
            shutil.rmtree(str(out_dir) + ".ckpt", ignore_errors=True)
        T.log_metrics(client, run_id, {k: stats[k] for k in SUMMARY_KEYS if k in stats})
        T.log_json(client, run_id, stats, "stats.json")
        T.set_tags(client, run_id, {"frugalflow.cached": cached, "frugalflow.output_dir": out_dir,
                                    "frugalflow.worker": f"{socket.gethostname()}:{os.getpid()}"})
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    finally:
        lock.release()
    summary = ", ".join(f"{k}={stats[k]:.4g}" for k in SUMMARY_KEYS if isinstance(stats.get(k), (int, float)))
    logger.info("stage %d %s done%s: %s", index, stage.method, " (cached)" if cached else "", summary)
    return {"dir": str(out_dir), "key": key, "run_id": run_id, "cached": cached,
            "stats": {k: stats[k] for k in SUMMARY_KEYS if k in stats}}
