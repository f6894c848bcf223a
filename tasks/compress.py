"""Prefect task: one compression stage as one MLflow child run.

The output directory is named by a content key (input model key + stage config + data key + the
source of the code the stage runs, `method_code_hash`), so running again with unchanged inputs
reuses the finished directory instead of recomputing it. A stage computes into a temporary sibling folder, writes `stats.json`
and a `manifest.json` of every file's SHA-256 there, and renames it into place
(frugalflow/integrity.py): the entry is complete or absent. On reuse the manifest is checked; a
truncated or altered entry is logged, moved aside (`<name>.corrupt-<id>`) and recomputed. With a
shared stage store (tasks/stage_store.py, `store`) an entry missing here is fetched from it, a sealed
entry is uploaded to it once, and inside a Dask worker the cluster's lock on the entry's name makes
one worker compute it while the others wait and fetch it.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import threading
from pathlib import Path

from filelock import FileLock
from prefect import get_run_logger, task

from frugalflow.code_hash import code_hash
from frugalflow.config import fingerprint
from frugalflow.errors import CorruptData
from frugalflow.integrity import quarantine, remove_stale_temps, seal_dir, temp_sibling, verify_manifest
from frugalflow.method import SEARCH_DIR
from frugalflow.pausepoints import pause_point
from frugalflow.progress import ProgressBar
from frugalflow.stages import run_stage
from tasks import stage_store
from tasks import tracking as T
from tasks.gpu_slot import gpu_slot
from tasks.runstate import close_failed, process_tags

# transformers builds modules under process-wide patches (meta-device init), so two stages in
# threads of one process corrupt each other's parameters: in one process stages compute one at
# a time. The sweep flow runs candidates in worker processes (flows/sweep.py) for parallel compute.
_COMPUTE = threading.Lock()
SUMMARY_KEYS = ("seconds", "sparsity", "bits_per_weight", "n_params", "final_loss", "seconds_per_step", "steps",
                "ppl_before", "ppl_after")


def method_code_hash(stage) -> str:
    """Content hash of the code the stage runs: its method's module (the config class's `entry`), the
    stage driver and what they import (frugalflow/code_hash.py). An edit elsewhere in the library
    reuses the stage's output; an edit of that code recomputes it."""
    return code_hash(type(stage).entry.partition(":")[0], "frugalflow.stages")


def stage_key(input_key: str, stage, data_key: str) -> str:
    return fingerprint(input_key, stage, data_key, method_code_hash(stage))


def stage_dir_name(index: int, stage, key: str) -> str:
    """The folder a stage's output lives in under `<artifacts>/stages/`: `<index>-<method>-<key>`."""
    return f"{index}-{stage.method}-{key}"


def stage_dir_names(base_key: str, data_key: str, stages) -> list[str]:
    """The folder names (with their content keys) `stages` will write, in order, from the base model's
    and the data's keys alone: known before any stage runs."""
    key, names = base_key, []
    for index, stage in enumerate(stages):
        key = stage_key(key, stage, data_key)
        names.append(stage_dir_name(index, stage, key))
    return names


def final_stage_name(base_key: str, data_key: str, stages) -> str:
    """The folder name the last of `stages` will write (`stage_dir_names`)."""
    return stage_dir_names(base_key, data_key, stages)[-1]


@task(name="compress-stage")
def compress_stage(stage, index: int, input_dir: str, input_key: str, *, data_dir: str, data_key: str,
                   teacher_dir: str, artifacts_dir: str, device: str, seed: int, pruned: bool,
                   tracking: T.Tracking, store: str | None = None) -> dict:
    logger = get_run_logger()
    key = stage_key(input_key, stage, data_key)
    out_dir = Path(artifacts_dir) / "stages" / stage_dir_name(index, stage, key)
    client = T.connect(tracking.uri)
    run_id = T.start_run(client, tracking.experiment_id, f"{index}-{stage.kind}-{stage.method}",
                         parent_run_id=tracking.parent_run_id,
                         tags={"frugalflow.stage": stage.kind, "frugalflow.method": stage.method,
                               "frugalflow.input_key": input_key, "frugalflow.key": key, **process_tags()})
    T.log_params(client, run_id, {f"stage.{k}": v for k, v in stage.model_dump(mode="json").items()})
    stats_file = out_dir / "stats.json"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    locks = contextlib.ExitStack()
    tmp = None
    try:
        if store:  # workers of one cluster that share no folder
            locks.enter_context(stage_store.cluster_lock(out_dir.name))
        locks.enter_context(FileLock(str(out_dir) + ".lock"))  # two candidates sharing this stage compute it once
        for stale in remove_stale_temps(out_dir):
            logger.warning("stage %d %s: removed %s, left by an interrupted write", index, stage.method, stale)
        cached = False
        if out_dir.exists():
            try:
                verify_manifest(out_dir)
                stats = json.loads(stats_file.read_text())
                cached = True
            except (CorruptData, ValueError, OSError) as exc:
                moved = quarantine(out_dir)
                logger.warning("stage %d %s: cache entry not reused: %s; moved to %s, recomputing", index,
                               stage.method, exc, moved.name)
        shared = ""
        if not cached and store and stage_store.fetch(out_dir, store):  # another worker computed it
            stats, cached, shared = json.loads(stats_file.read_text()), True, "fetched"
        if cached:
            logger.info("stage %d %s: reusing %s (inputs unchanged, checksums verified%s)", index, stage.method,
                        out_dir, f"; fetched from the stage store {store}" if shared else "")
        else:
            logger.info("stage %d %s: compressing %s -> %s", index, stage.method, input_dir, out_dir)
            tmp = temp_sibling(out_dir)
            reports = [0]

            def report(message: str, metrics: dict) -> None:
                logger.info("stage %d %s: %s", index, stage.method, message)
                step = int(metrics.pop("step", 0))
                T.log_metrics(client, run_id, metrics, step=step)
                reports[0] += 1
                if reports[0] == 1:
                    pause_point(f"stage{index}.compute")
                if step:
                    pause_point(f"stage{index}.step{step}")

            bar = ProgressBar(f"stage {index} {stage.method}")  # drawn only when stderr is a terminal
            with _COMPUTE, gpu_slot(f"stage {index} {stage.method}",  # one card, one stage at a time
                                    record=lambda hold: T.log_metrics(client, run_id, hold.metrics())), bar:
                stats = run_stage(stage, input_dir, tmp, data_dir=data_dir, teacher_dir=teacher_dir,
                                  device=device, seed=seed, checkpoint_dir=str(out_dir) + ".ckpt", pruned=pruned,
                                  report=report, progress=bar)
            (tmp / "stats.json").write_text(json.dumps(stats, indent=1, default=float) + "\n")
            pause_point(f"stage{index}.save")
            seal_dir(tmp, out_dir)  # manifest + fsync + rename: complete or absent
            tmp = None
            shutil.rmtree(str(out_dir) + ".ckpt", ignore_errors=True)
        if store and not shared:
            shared = "uploaded" if stage_store.publish(out_dir, store) else "present"
            logger.info("stage %d %s: %s the stage store %s", index, stage.method,
                        "uploaded to" if shared == "uploaded" else "already in", store)
        T.log_metrics(client, run_id, {k: stats[k] for k in SUMMARY_KEYS if k in stats})
        T.log_json(client, run_id, stats, "stats.json")
        if (out_dir / SEARCH_DIR).is_dir():  # the method's search result (frugalflow/method.py)
            client.log_artifacts(run_id, str(out_dir / SEARCH_DIR), SEARCH_DIR)
        T.set_tags(client, run_id, {"frugalflow.cached": cached, "frugalflow.output_dir": out_dir,
                                    **({"frugalflow.stage_store": shared} if shared else {}),
                                    "frugalflow.worker": f"{socket.gethostname()}:{os.getpid()}"})
        T.end_run(client, run_id)
    except BaseException as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        close_failed(client, run_id, f"{type(exc).__name__}: {exc}")
        raise
    finally:
        locks.close()
    summary = ", ".join(f"{k}={stats[k]:.4g}" for k in SUMMARY_KEYS if isinstance(stats.get(k), (int, float)))
    logger.info("stage %d %s done%s: %s", index, stage.method, " (cached)" if cached else "", summary)
    return {"dir": str(out_dir), "key": key, "run_id": run_id, "cached": cached,
            "stats": {k: stats[k] for k in SUMMARY_KEYS if k in stats}}
