"""The sweep flow: a grid over recipe keys, candidates compressed in parallel, the Pareto-best
passing candidate gated, registered and promoted.

    frugalflow sweep -g stages.0.sparsity=0.1,0.3 -g stages.1.bits=4,8   # four candidates

MLflow: one sweep run; under it one run per candidate (params, metrics `ppl`, `size_mb`,
`decode_tps`, verdict, tags `frugalflow.pareto` / `frugalflow.selected`), and under each of
those its stage runs. Stages of different candidates run at once through the flow's task
runner: `sweep.max_parallel` worker processes (Prefect's ProcessPoolTaskRunner), which share
the machine's cores; a stage shared by two candidates is computed once under a file lock, the
other waits for it. Processes, not threads: transformers builds models under process-wide
patches, so two threads of one process cannot compute at once (tasks/compress.py). Evaluations
start when every candidate is compressed and run one at a time in the flow's process, so that
decode speeds are comparable. With `--cluster tcp://HOST:PORT` the stages go to an existing Dask
cluster instead (Prefect's DaskTaskRunner, `cluster_runner`); Dask retries a lost worker's tasks
on another.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.task_runners import ProcessPoolTaskRunner

from flows.candidate import candidate_stages, evaluate_baseline, evaluate_candidate, judge, publish
from flows.nightly import start_parent_run
from flows.project import load_flow_recipe, open_project, project_root
from frugalflow.config import RecipeError
from frugalflow.gates import rank
from frugalflow.pareto import pareto_front
from frugalflow.sweep import as_overrides, expand_grid, label, parse_grid_option
from tasks import tracking as T
from tasks.runstate import close_failed, process_tags

FRONT = {"minimize": ("ppl", "size_mb"), "maximize": ("decode_tps",)}


def candidate_recipes(params: str, grid_options: list[str], overrides: list[str]) -> list[tuple[str, dict, object]]:
    """(label, assignment, validated recipe) for every grid point of the recipe's `sweep.grid`
    plus `grid_options` (KEY=V1,V2); all are validated before any heavy work, and an invalid
    one names its grid point."""
    params_path = Path(params).resolve()
    root = project_root(params_path)
    grid = dict(load_flow_recipe(params_path, root, overrides).sweep.grid)
    for text in grid_options:
        key, values = parse_grid_option(text)
        grid[key] = values
    if not grid:
        raise RecipeError("sweep", ["no grid: pass -g KEY=V1,V2 (e.g. -g stages.0.sparsity=0.1,0.3) "
                                    "or set sweep.grid in the recipe"])
    out = []
    for assignment in expand_grid(grid):
        name = label(assignment)
        try:
            recipe = load_flow_recipe(params_path, root, overrides + as_overrides(assignment))
        except RecipeError as exc:
            raise RecipeError(f"sweep candidate {name}", exc.problems) from None
        out.append((name, assignment, recipe))
    return out


def share_cores(workers: int) -> None:
    """Worker initializer: each of `workers` processes gets its share of the cores, so that
    parallel candidates do not oversubscribe the machine."""
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def sweep_runner(workers: int) -> ProcessPoolTaskRunner:
    """The task runner that computes `workers` candidates at once, one per process."""
    return ProcessPoolTaskRunner(max_workers=workers, initializer=share_cores, initargs=(workers,))


def cluster_runner(address: str):
    """The task runner that sends candidates to an existing Dask cluster (Prefect's DaskTaskRunner).

    `address` is the scheduler's tcp://HOST:PORT; a malformed one is BadInput (exit 2), a scheduler
    that does not answer is ServiceUnavailable (exit 4), both before any work starts."""
    import socket
    from urllib.parse import urlsplit

    from frugalflow.errors import BadInput, ServiceUnavailable

    parts = urlsplit(address)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "tcp" or not parts.hostname or port is None or parts.path not in ("", "/"):
        raise BadInput(f"--cluster {address!r}: expected a Dask scheduler address tcp://HOST:PORT")
    try:
        socket.create_connection((parts.hostname, port), timeout=5).close()
    except OSError as exc:
        raise ServiceUnavailable(f"Dask scheduler at {address} does not answer ({exc}); start it with "
                                 f"`dask scheduler --port {port}` or drop --cluster to use local processes") from None
    from prefect_dask import DaskTaskRunner

    return DaskTaskRunner(address=address)


def runner_for(workers: int, cluster: str | None = None):
    """Dask cluster when `cluster` is given, else `workers` local processes."""
    return cluster_runner(cluster) if cluster else sweep_runner(workers)


def summary_markdown(rows: list[dict], objective: str) -> str:
    lines = [f"# Sweep: {len(rows)} candidates (objective {objective})", "",
             "| candidate | ppl | size MB | decode tok/s | gates | Pareto front | selected |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r.get("metrics") or {}
        cells = [f"{m[k]:.3f}" if k in m else "-" for k in ("ppl", "size_mb", "decode_tps")]
        gates = "failed to run" if r.get("error") else ("pass" if r["verdict"]["passed"] else "FAIL")
        lines.append(f"| {r['label']} | {' | '.join(cells)} | {gates} | {'yes' if r.get('pareto') else ''} | "
                     f"{'**yes**' if r.get('selected') else ''} |")
    return "\n".join(lines) + "\n"


@flow(name="frugalflow-sweep", log_prints=True, task_runner=sweep_runner(2))
def sweep_flow(params: str = "params.yaml", grid: list[str] | None = None,
               overrides: list[str] | None = None) -> dict:
    logger = get_run_logger()
    overrides = list(overrides or [])
    candidates = candidate_recipes(params, list(grid or []), overrides)
    project = open_project(params, overrides)
    recipe = project.recipe
    logger.info("sweep of %d candidates: %s", len(candidates), "; ".join(c[0] for c in candidates))
    sweep = start_parent_run(project, f"{recipe.name}-sweep", tags={"frugalflow.sweep": "true"})
    client = T.connect(project.uri)
    T.log_json(client, sweep.parent_run_id, {name: a for name, a, _ in candidates}, "sweep/grid.json")
    rows: list[dict] = []
    try:
        baseline = evaluate_baseline(project)
        T.log_metrics(client, sweep.parent_run_id, {f"baseline.{k}": v for k, v in baseline.items()})
        for name, assignment, cand in candidates:
            run = T.start_run(client, project.experiment_id, name, parent_run_id=sweep.parent_run_id,
                              tags={**project.lineage_tags, "frugalflow.recipe": cand.name,
                                    "frugalflow.sweep_run": sweep.parent_run_id,
                                    "frugalflow.assignment": json.dumps(assignment), **process_tags()})
            T.log_params(client, run, {f"sweep.{k}": v for k, v in assignment.items()})
            tracking = T.Tracking(uri=project.uri, experiment_id=project.experiment_id, parent_run_id=run)
            rows.append({"label": name, "assignment": assignment, "recipe": cand, "tracking": tracking,
                         "future": candidate_stages.with_options(task_run_name=f"stages[{name}]")
                         .submit(project, cand, tracking)})
        for row in rows:
            try:
                row["stages"] = row.pop("future").result()
            except Exception as exc:  # one broken candidate does not sink the sweep
                row["error"] = f"{type(exc).__name__}: {exc}"
                logger.error("candidate %s failed: %s", row["label"], row["error"])
                close_failed(client, row["tracking"].parent_run_id, row["error"])
        for row in rows:  # once every stage is done: one at a time, in grid order
            if "error" in row:
                continue
            row["dir"] = row["stages"][-1]["dir"]
            row["metrics"] = evaluate_candidate(project, row["recipe"], row["dir"], row["tracking"], row["label"])
            row["verdict"] = judge(project, row["recipe"], row["metrics"], baseline, row["tracking"])
        done = [r for r in rows if "metrics" in r]
        for i in pareto_front([r["metrics"] for r in done], **FRONT):
            done[i]["pareto"] = True
        passing = [r for r in done if r.get("pareto") and r["verdict"]["passed"]]
        best = None
        if passing:
            ranked = rank([{**r["metrics"], "_row": k} for k, r in enumerate(passing)], recipe.registry.objective)
            best = passing[ranked[0]["_row"]]
            best["selected"] = True
        for r in done:
            T.set_tags(client, r["tracking"].parent_run_id, {"frugalflow.pareto": bool(r.get("pareto")),
                                                             "frugalflow.selected": bool(r.get("selected"))})
        promotion = {"registered": False, "version": None, "champion": False}
        if best is not None:
            logger.info("selected %s: on the Pareto front, passes its gates, best %s", best["label"],
                        recipe.registry.objective)
            promotion = publish(project, best["recipe"], best["dir"], best["tracking"], baseline=baseline,
                                candidate=best["metrics"], stages=best["stages"], verdict=best["verdict"])
        else:
            logger.warning("no candidate on the Pareto front passed its gates; nothing registered")
        for r in done:
            client.set_terminated(r["tracking"].parent_run_id, "FINISHED")
        table = [{"label": r["label"], "assignment": r["assignment"], "metrics": r.get("metrics"),
                  "passed": r.get("verdict", {}).get("passed"), "pareto": bool(r.get("pareto")),
                  "selected": bool(r.get("selected")), "run_id": r["tracking"].parent_run_id,
                  "error": r.get("error")} for r in rows]
        T.log_json(client, sweep.parent_run_id, table, "sweep/candidates.json")
        T.log_text(client, sweep.parent_run_id, summary_markdown(rows, recipe.registry.objective),
                   "sweep/summary.md")
        T.set_tags(client, sweep.parent_run_id, {"frugalflow.selected": best["label"] if best else "none",
                                                 "frugalflow.selected_run": best["tracking"].parent_run_id
                                                 if best else ""})
        client.set_terminated(sweep.parent_run_id, "FINISHED")
    except BaseException as exc:
        close_failed(client, sweep.parent_run_id, f"{type(exc).__name__}: {exc}")
        for r in rows:
            if "metrics" not in r and "error" not in r:
                close_failed(client, r["tracking"].parent_run_id, f"the sweep failed: {type(exc).__name__}")
        raise
    return {"run_id": sweep.parent_run_id, "candidates": table, "selected": best["label"] if best else None,
            "promotion": promotion, "baseline": baseline}
