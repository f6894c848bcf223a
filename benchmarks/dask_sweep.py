"""A sweep's timeline on two share-nothing Dask workers against the process pool on one machine, in one run.

    python benchmarks/dask_sweep.py [--model smollm2|tiny] [--rounds 2]

Starts the team stack (`frugalflow team up` on free loopback ports: PostgreSQL-backed MLflow server,
Prefect server, moto's S3 API); for each Dask sweep a `dask scheduler` and two `dask worker`
processes (one thread each, each in its own empty folder, the team's client environment). Each round runs the same 2 x 2 sweep
(magnitude sparsity 0.2/0.4 x RTN 4/8 bits, on a fresh project, for Dask a new cluster with empty
worker folders and a new stage store, so nothing is reused across sweeps) twice, in
alternating order: `frugalflow sweep --parallel 2` (Prefect's process pool on this machine) and
`frugalflow sweep --cluster tcp://...` with a fresh stage store. Both track on the team's MLflow
server; the timeline is read back from the stage runs (start, end, tag `frugalflow.worker`).
Writes benchmarks/results/dask_sweep.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import build_tiny_llama, build_tiny_tokenizer  # noqa: E402
from helpers import dask_cluster, make_project, tiny_recipe  # noqa: E402
from team_stack import start_team  # noqa: E402

GRID = ["stages.0.sparsity=0.2,0.4", "stages.1.bits=4,8"]


def recipe(model: Path, name: str, mlflow_uri: str, window: int) -> dict:
    return tiny_recipe(model, name, stages=[{"method": "magnitude", "sparsity": 0.2},
                                            {"method": "rtn", "bits": 4, "group_size": 64}],
                       data={"window": window, "calib_windows": 4, "train_windows": 4, "eval_windows": 8},
                       evaluation={"decode_tokens": 16, "decode_repeats": 1, "decode_race_rounds": 1},
                       gates={"max_ppl_increase_pct": 1000.0, "min_size_reduction": 1.0},
                       tracking={"uri": mlflow_uri})


def sweep(project: Path, env: dict, runner: list[str]) -> float:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "flows.cli", "sweep", "-p", str(project / "params.yaml"),
                           *[a for g in GRID for a in ("-g", g)], *runner], cwd=project,
                          env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    took = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"sweep {runner} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return took


def timeline(mlflow_uri: str, experiment: str) -> dict:
    """The sweep's stage runs as (worker, candidate, stage, start s, end s) from the sweep run's start."""
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([exp], max_results=1000)
    by_id = {r.info.run_id: r for r in runs}
    top = [r for r in runs if r.data.tags.get("frugalflow.sweep") == "true"][0]
    t0 = top.info.start_time
    rows = []
    for r in runs:
        if "frugalflow.stage" not in r.data.tags:
            continue
        parent = by_id[r.data.tags["mlflow.parentRunId"]]
        rows.append({"worker": r.data.tags["frugalflow.worker"], "candidate": parent.info.run_name,
                     "stage": r.info.run_name, "cached": r.data.tags.get("frugalflow.cached") == "True",
                     "store": r.data.tags.get("frugalflow.stage_store", ""),
                     "start_s": round((r.info.start_time - t0) / 1000, 1), "end_s": round((r.info.end_time - t0) / 1000, 1)})
    rows.sort(key=lambda row: (row["worker"], row["start_s"]))
    workers = sorted({row["worker"] for row in rows})
    return {"sweep_s": round((top.info.end_time - t0) / 1000, 1), "workers": workers,
            "stages_span_s": round(max(r["end_s"] for r in rows) - min(r["start_s"] for r in rows), 1),
            "busy_s": {w: round(sum(r["end_s"] - r["start_s"] for r in rows if r["worker"] == w), 1) for w in workers},
            "rows": rows}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runners = list(result["timelines"])
    fig, axes = plt.subplots(len(runners), 1, figsize=(9, 2.2 * len(runners)), sharex=True)
    colors = {"magnitude": "tab:blue", "rtn": "tab:orange"}
    for ax, runner in zip(axes, runners):
        line = result["timelines"][runner]
        for y, worker in enumerate(line["workers"]):
            for row in (r for r in line["rows"] if r["worker"] == worker):
                method = row["stage"].split("-")[-1]
                ax.barh(y, row["end_s"] - row["start_s"], left=row["start_s"], color=colors.get(method, "grey"),
                        alpha=0.4 if row["cached"] else 0.9, edgecolor="black", linewidth=0.5)
        ax.set_yticks(range(len(line["workers"])), [f"worker {i}" for i in range(len(line["workers"]))])
        ax.set_title(f"{runner}: sweep {line['sweep_s']} s, stages from first start to last end {line['stages_span_s']} s",
                     fontsize=9)
    axes[-1].set_xlabel("seconds from the sweep run's start (blue: magnitude, orange: RTN; pale: reused)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="frugalflow-dask-bench-"))
    if args.model == "tiny":
        model, window = scratch / "tiny-llama", 64
        build_tiny_llama().save_pretrained(model)
        build_tiny_tokenizer().save_pretrained(model)
    else:
        from frugalflow.config import BaseModelConfig
        from frugalflow.fetch_model import fetch_model

        model, window = fetch_model(BaseModelConfig(), scratch / "smollm2"), 256
    load = os.getloadavg()[0]
    stack = start_team(scratch / "team")
    env = stack.env()
    walls: dict[str, list[float]] = {"process pool": [], "dask": []}
    timelines: dict[str, dict] = {}
    try:
        for i in range(args.rounds):
            order = ["process pool", "dask"] if i % 2 == 0 else ["dask", "process pool"]
            for runner in order:
                name = f"{'pool' if runner == 'process pool' else 'dask'}-{i}-{uuid.uuid4().hex[:6]}"
                folder = scratch / name
                folder.mkdir()
                project = make_project(folder, recipe(model, name, stack.mlflow_uri, window))
                if runner == "dask":  # a new cluster: workers with empty folders, a new stage store
                    homes = scratch / f"cluster-{name}"
                    store = f"s3://{stack.buckets['models']}/bench-{name}"
                    with dask_cluster(homes, [homes / "worker0", homes / "worker1"],
                                      stack.env(OMP_NUM_THREADS="1")) as address:
                        walls[runner].append(sweep(project, {**env, "FRUGALFLOW_STAGE_STORE": store},
                                                   ["--cluster", address]))
                else:
                    walls[runner].append(sweep(project, {k: v for k, v in env.items() if k != "FRUGALFLOW_STAGE_STORE"},
                                               ["--parallel", "2"]))
                timelines[runner] = timeline(stack.mlflow_uri, name)
                print(f"round {i + 1} {runner}: {walls[runner][-1]:.1f} s", flush=True)
    finally:
        stack.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in walls.items()}
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.node()}, {os.cpu_count()} cores",
              "model": args.model, "grid": GRID, "load_1min_at_start": round(load, 2),
              "load_1min_at_end": round(os.getloadavg()[0], 2), "wall_s": walls,
              "median_wall_s": {k: round(v, 1) for k, v in med.items()},
              "dask_over_pool": round(med["dask"] / med["process pool"], 2), "timelines": timelines}
    out = ROOT / "benchmarks" / "results"
    (out / "dask_sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "dask_sweep.png")
    lines = [f"# Sweep on two Dask workers vs the process pool ({result['date']}, {result['machine']}, "
             f"1-min load {result['load_1min_at_start']} at start, {result['load_1min_at_end']} at end)", "",
             f"Model {args.model}; grid {' x '.join(GRID)} over magnitude -> RTN g64 (4 candidates, 2 prune stages "
             f"shared by two candidates each); {args.rounds} rounds, runners alternating, a fresh project each; the team "
             "stack's MLflow server for both; Dask: a new scheduler + 2 workers per sweep (1 thread each, own empty "
             "folders, inputs and stages through a fresh S3 stage store); process pool: `--parallel 2`. "
             "Wall: `frugalflow sweep` subprocess, "
             "start to exit (includes evaluation of the 4 candidates one at a time in the flow's process). Stage store: "
             "`uploaded` (computed here, sent to S3), `fetched` (downloaded from S3), `present` (already in S3).", "",
             "| runner | wall s (median) | rounds | stage runs first start -> last end (last round) | busy s per worker |",
             "|---|---|---|---|---|"]
    for runner, line in timelines.items():
        lines.append(f"| {runner} | {med[runner]:.1f} | {[round(w, 1) for w in walls[runner]]} | {line['stages_span_s']} | "
                     f"{', '.join(f'{v}' for v in line['busy_s'].values())} |")
    lines += ["", f"dask / process pool wall: {result['dask_over_pool']}x", "", "![timeline](dask_sweep.png)", "",
              "Last round's stage runs (seconds from the sweep run's start):", "",
              "| runner | worker | candidate | stage | reused | stage store | start | end |",
             "|---|---|---|---|---|---|---|---|"]
    for runner, line in timelines.items():
        for row in line["rows"]:
            lines.append(f"| {runner} | {line['workers'].index(row['worker'])} | {row['candidate']} | {row['stage']} | "
                         f"{'yes' if row['cached'] else 'no'} | {row['store'] or '-'} | {row['start_s']} | {row['end_s']} |")
    (out / "dask_sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
