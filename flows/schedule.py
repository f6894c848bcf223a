"""The nightly deployment: `compression_flow` on `params.yaml`'s `schedule` (cron + time zone).

Two ways to run the flow every night; pick one per Prefect server (both are named
`frugalflow-nightly/nightly`, so the last one applied owns the deployment):

1. One machine, this module: a long-running process that registers the deployment and
   executes its runs itself (Prefect's `serve`; no work pool, no worker):

       prefect server start &                                # the scheduler lives in the server
       export PREFECT_API_URL=http://127.0.0.1:4200/api
       frugalflow schedule                                   # or: python -m flows.schedule params.yaml

   Runs start in a subprocess of the serve process, one at a time; stopping the process
   (Ctrl-C) pauses the schedule, starting it again resumes it. Prefect's ephemeral API
   (no PREFECT_API_URL) has no scheduler, so serving is refused without a server.
2. Team mode: `infra/prefect.yaml` + a worker on the `gpu` work pool
   (`prefect deploy --prefect-file infra/prefect.yaml --name nightly`, see infra/README.md);
   its cron must match `params.yaml` (tests/test_infra.py checks it).

The schedule is checked with the rest of the recipe (frugalflow/cron.py, so `validate` and `run`
refuse what this module would): `schedule.cron` must be a five-field cron that Prefect accepts
and that fires at all, `schedule.timezone` an IANA name (zoneinfo); failures are `RecipeError`s
naming the key, like every other recipe problem. `check_schedule` asks Prefect itself once more.
"""
from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Iterable
from zoneinfo import ZoneInfo

from frugalflow.config import RecipeError, ScheduleConfig

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

DEPLOYMENT = "nightly"
FLOW_NAME = "frugalflow-nightly"  # the @flow name of flows.nightly.compression_flow
FULL_NAME = f"{FLOW_NAME}/{DEPLOYMENT}"


def check_schedule(schedule: ScheduleConfig, source: str = "params.yaml") -> None:
    """Prefect's own check of a schedule the recipe accepted (ScheduleConfig checks the cron and time
    zone as Prefect reads them; tests/test_schedule.py keeps the two in step): RecipeError if it refuses."""
    from prefect.schedules import Cron

    try:
        Cron(schedule.cron, timezone=schedule.timezone)
        next_runs(schedule.cron, schedule.timezone, 1)
    except (ValueError, StopIteration) as exc:
        reason = str(exc) if not isinstance(exc, StopIteration) else "it never fires"
        raise RecipeError(source, [f"schedule.cron: Prefect refuses {schedule.cron!r} in {schedule.timezone!r} "
                                   f"({reason}); five fields: minute hour day-of-month month day-of-week, "
                                   "e.g. '0 2 * * *'"]) from None


def next_runs(cron: str, tz: str, n: int = 3, after: datetime | None = None) -> list[datetime]:
    """The next `n` times the cron fires in time zone `tz` (aware datetimes in that zone)."""
    from cronsim import CronSim, CronSimError

    start = (after or datetime.now(timezone.utc)).astimezone(ZoneInfo(tz)).replace(microsecond=0)
    try:
        times = CronSim(cron, start)
        return [next(times) for _ in range(n)]
    except CronSimError as exc:
        raise ValueError(str(exc)) from None


def nightly_deployment(params_path: str | Path = "params.yaml", overrides: Iterable[str] = ()) -> RunnerDeployment:
    """The `nightly` deployment of `compression_flow`, scheduled by the recipe's `schedule`.

    The recipe is loaded exactly as the flow will load it (project root, DVC-owned sections,
    overrides), so a recipe that would fail at 02:00 fails here instead. Runs get the
    recipe's absolute path, so the serving process may start from any directory.
    """
    from prefect.schedules import Cron
    from prefect.types.entrypoint import EntrypointType

    from flows.nightly import compression_flow
    from frugalflow.recipe_io import load_recipe

    path = Path(params_path).resolve()
    overrides = list(overrides)
    recipe = load_recipe(path, overrides, checks="run")
    check_schedule(recipe.schedule, str(path))
    deployment = compression_flow.to_deployment(
        name=DEPLOYMENT,
        # to_deployment has no timezone argument in Prefect 3.8: cron + time zone go in one Schedule
        schedule=Cron(recipe.schedule.cron, timezone=recipe.schedule.timezone),
        parameters={"params": str(path), "overrides": overrides},
        description=f"Nightly compression of recipe {recipe.name} ({path})",
        tags=["frugalflow", "nightly"],
        concurrency_limit=1,  # as infra/prefect.yaml: a run that overlaps the previous one waits
        # the module path (not a file path relative to the current directory) so the
        # engine subprocess imports the installed package wherever the serve process runs
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    # explicitly None (as Prefect's own Runner.add_flow does) so that applying this deployment
    # takes it off a work pool that `prefect deploy` of infra/prefect.yaml may have put it in
    deployment.work_pool_name = None
    deployment.work_queue_name = None
    return deployment


def check_nightly(params_path: str | Path = "params.yaml", overrides: Iterable[str] = (), n: int = 3) -> str:
    """Validate the recipe and its schedule; a few lines: the deployment and its next `n` runs."""
    deployment = nightly_deployment(params_path, overrides)
    schedule = deployment.schedules[0].schedule
    lines = [f"{FULL_NAME}: {schedule.cron!r} in {schedule.timezone}, recipe {deployment.parameters['params']}"]
    for t in next_runs(schedule.cron, schedule.timezone, n):
        lines.append(f"  next run {t.strftime('%Y-%m-%d %H:%M %Z')} ({t.astimezone(timezone.utc):%Y-%m-%d %H:%M} UTC)")
    return "\n".join(lines)


def require_server() -> str:
    """PREFECT_API_URL as Prefect sees it; a clear error when it is not set."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise ConnectionError("a schedule needs a Prefect server (the ephemeral API has no scheduler): "
                              "run `prefect server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api")
    return url


def serve_nightly(params_path: str | Path = "params.yaml", overrides: Iterable[str] = ()) -> None:
    """Register the nightly deployment and run its flow runs until interrupted (Ctrl-C/SIGTERM
    pause the schedule). Runs triggered by hand (`prefect deployment run frugalflow-nightly/nightly`)
    execute here too."""
    import prefect

    url = require_server()
    deployment = nightly_deployment(params_path, overrides)
    schedule = deployment.schedules[0].schedule
    upcoming = ", ".join(t.strftime("%Y-%m-%d %H:%M %Z") for t in next_runs(schedule.cron, schedule.timezone, 3))
    print(f"{FULL_NAME}: {schedule.cron!r} in {schedule.timezone}; next runs {upcoming}; "
          f"recipe {deployment.parameters['params']}; API {url}\nserving its runs here; Ctrl-C stops and pauses "
          "the schedule", flush=True)
    prefect.serve(deployment, limit=1, pause_on_shutdown=True, print_starting_message=False)


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.schedule [FILE] [-s K=V] [--check]`: the CLI's `schedule` command (one typer
    app, flows/cli.py), with its exit codes: bad input 2, no reachable Prefect server 4."""
    from flows.cli import main as cli

    try:
        code = cli(["schedule", *(sys.argv[1:] if argv is None else argv)])
    except SystemExit as exc:  # the recipe check and usage errors exit this way
        code = exc.code if isinstance(exc.code, int) else 1
    return code


if __name__ == "__main__":
    sys.exit(main())
