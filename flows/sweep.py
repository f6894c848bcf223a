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
on another. With a stage store (FRUGALFLOW_STAGE_STORE) the cluster's workers share nothing but
the stores (flows/workspace.py): inputs and stage outputs move through S3, tracking goes to the
recipe's MLflow server; without one they must see the project folder at the same path.
"""
from __future__ import annotations

import os

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.task_runners import ProcessPoolTaskRunner

from flows.candidate import candidate_stages, evaluate_baseline, evaluate_candidate, judge, publish
from flows.nightly import start_parent_run
from flows.project import open_project
from flows.secret_overrides import restore as restore_secrets
from flows.workspace import bring_back, publish_inputs
from frugalflow.config import RecipeError
from frugalflow.recipe_io import RecipeSource, load_recipe
from frugalflow.sweep import Candidate, as_overrides, expand_grid, label, parse_grid_option, select
from tasks.sweep_runs import SweepRuns


def candidate_recipes(source: RecipeSource, grid_options: list[str], overrides: list[str]) -> list[Candidate]:
    """A Candidate (label, assignment, validated recipe) for every grid point of the recipe's `sweep.grid`
    plus `grid_options` (KEY=V1,V2); all are validated before any heavy work, from the file as read once
    (`source`), and an invalid one names its grid point."""
    grid = dict(load_recipe(source, overrides, checks="run").sweep.grid)
    given = set()
    for text in grid_options:
        key, values = parse_grid_option(text)
        if key in given:
            raise RecipeError("grid", [f"-g {key} given twice: list its values in one -g, e.g. {key}=V1,V2"])
        given.add(key)
        grid[key] = values  # replaces the recipe's sweep.grid values for that key
    if not grid:
        raise RecipeError("grid", ["no grid: pass -g KEY=V1,V2 (e.g. -g stages.0.sparsity=0.1,0.3) "
                                    "or set sweep.grid in the recipe"])
    out = []
    for assignment in expand_grid(grid):
        name = label(assignment)
        try:
            recipe = load_recipe(source, overrides + as_overrides(assignment), checks="run")
        except RecipeError as exc:
            raise RecipeError(f"candidate {name}", exc.problems) from None
        out.append(Candidate(name, assignment, recipe))
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


def on_cluster() -> bool:
    """Whether this flow run sends its tasks to Dask."""
    from prefect_dask import DaskTaskRunner

    context = FlowRunContext.get()
    return context is not None and isinstance(context.task_runner, DaskTaskRunner)


def runner_for(workers: int, cluster: str | None = None):
    """Dask cluster when `cluster` is given, else `workers` local processes."""
    return cluster_runner(cluster) if cluster else sweep_runner(workers)


@flow(name="frugalflow-sweep", log_prints=True, task_runner=sweep_runner(2))
def sweep_flow(params: str = "params.yaml", grid: list[str] | None = None,
               overrides: list[str] | None = None, source: RecipeSource | None = None) -> dict:
    """`source`: the recipe file `params` as `frugalflow sweep` read it (stored as its path in the flow
    run's parameters); without it the flow reads `params`. Either way the file is read once."""
    logger = get_run_logger()
    overrides = restore_secrets(overrides)  # those `frugalflow sweep` kept out of the parameters
    source = source or RecipeSource.read(params)
    candidates = candidate_recipes(source, list(grid or []), overrides)
    project = open_project(params, overrides, source)
    objective = project.recipe.registry.objective
    logger.info("sweep of %d candidates: %s", len(candidates), "; ".join(c.label for c in candidates))
    runs = SweepRuns(start_parent_run(project, f"{project.recipe.name}-sweep", tags={"frugalflow.sweep": "true"}))
    try:
        runs.log_grid(candidates)
        baseline = evaluate_baseline(project)
        runs.log_baseline(baseline)
        inputs = None
        if on_cluster() and project.stage_store:
            inputs = publish_inputs(project)
            logger.info("share-nothing workers: inputs %s in the stage store %s", ", ".join(inputs.values()),
                        project.stage_store)
        elif on_cluster():
            logger.warning("no stage store (FRUGALFLOW_STAGE_STORE): the Dask workers must see %s", project.root)
        futures = [candidate_stages.with_options(task_run_name=f"stages[{c.label}]")
                   .submit(project, c.recipe, runs.start_candidate(c, project.lineage_tags), inputs)
                   for c in candidates]
        for c, future in zip(candidates, futures):
            try:
                c.stages = bring_back(project, future.result()) if inputs else future.result()
            except Exception as exc:  # one broken candidate does not sink the sweep
                c.error = f"{type(exc).__name__}: {exc}"
                logger.error("candidate %s failed: %s", c.label, c.error)
                runs.candidate_failed(c)
        for c in candidates:  # once every stage is done: one at a time, in grid order
            if c.error is None:
                c.metrics = evaluate_candidate(project, c.recipe, c.model_dir, runs.tracking(c), c.label)
                c.verdict = judge(project, c.recipe, c.metrics, baseline, runs.tracking(c))
        best = select(candidates, objective)
        promotion = {"registered": False, "version": None, "champion": False}
        if best is not None:
            logger.info("selected %s: on the Pareto front, passes its gates, best %s", best.label, objective)
            promotion = publish(project, best.recipe, best.model_dir, runs.tracking(best), baseline=baseline,
                                candidate=best.metrics, stages=best.stages, verdict=best.verdict)
        else:
            logger.warning("no candidate on the Pareto front passed its gates; nothing registered")
        runs.finish(candidates, best, objective)
    except BaseException as exc:
        runs.fail(candidates, exc)
        raise
    return {"run_id": runs.sweep.parent_run_id, "candidates": [c.record() for c in candidates],
            "selected": best.label if best else None, "promotion": promotion, "baseline": baseline}
