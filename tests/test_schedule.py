"""The nightly deployment against a REAL Prefect server (subprocess on 127.0.0.1, free port):
the schedule stored by the server equals params.yaml's, the server's scheduler places runs at
the cron's times in the recipe's time zone, and a run triggered through the API is executed
by `python -m flows.schedule` (Prefect's serve) on a tiny project and reaches COMPLETED.

Known break: with SQLAlchemy >= 2.1 (the lock has 2.1.9) Prefect 3.8.8's scheduler service fails
on every loop ("Can't evaluate bulk DML statement", FlowRun.state is a hybrid property in its
bulk INSERT), so no scheduled run is ever created; that test is a strict xfail there and runs
for real once SQLAlchemy is pinned below 2.1."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import timezone
from pathlib import Path

import pytest
import sqlalchemy
from helpers import ROOT, client_for, free_port, make_project, stop, tail, tiny_recipe, wait_for, wait_healthy
from packaging.version import Version

from frugalflow.config import RecipeError, ScheduleConfig
from frugalflow.recipe_io import load_recipe, recipe_from_dict

SERVER_START_S, RUN_S = 90, 240
TINY_SCHEDULE = {"cron": "30 3 * * *", "timezone": "Asia/Kolkata"}  # UTC+05:30 all year: no DST edge
SQLALCHEMY_BREAKS_SCHEDULER = Version(sqlalchemy.__version__) >= Version("2.1")
pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------- helpers
def scheduler_errors(log: Path) -> list[str]:
    """ERROR lines of the server's scheduler task (`schedule_deployments`) in its log."""
    text = log.read_text(errors="replace") if log.exists() else ""
    return [line for line in text.splitlines() if "ERROR" in line and "schedule_deployments" in line]


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`prefect server start` in a subprocess with its own PREFECT_HOME (sqlite inside it)."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false",
               PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2", PREFECT_LOGGING_SERVER_LEVEL="WARNING")
    log = home / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                 "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                cwd=home, start_new_session=True)
    try:
        seconds = wait_healthy(proc, f"{url}/health", log, "prefect server", SERVER_START_S)
        print(f"prefect server healthy after {seconds:.1f} s on {url}")
        yield {"url": url, "home": home, "env": {**env, "PREFECT_API_URL": url}}
    finally:
        stop(proc, signal.SIGTERM)


@pytest.fixture
def api(server):
    """Prefect settings of this test process pointed at the server (settings are frozen at
    import, so the environment alone would not reach them)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: server["url"], PREFECT_HOME: server["home"] / "client"}):
        yield server


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir) -> Path:
    """A tiny frugalflow project (tests/helpers.py): local tiny Llama, pydoc windows of
    64 tokens, magnitude -> rtn -> 3 KL steps, sqlite MLflow store; its own schedule."""
    recipe = tiny_recipe(tiny_model_dir, "tiny-sched", schedule=TINY_SCHEDULE,
                         data={"calib_windows": 4, "train_windows": 8, "eval_windows": 4},
                         evaluation={"decode_tokens": 4}, gates={"min_size_reduction": 1.0})
    return make_project(tmp_path_factory.mktemp("project"), recipe)


def read_deployment(deployment_id):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_deployment(deployment_id)


def auto_scheduled_starts(deployment_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                any_=[StateType.SCHEDULED]))))
    return sorted(r.expected_start_time for r in runs if r.auto_scheduled)


# --------------------------------------------------------------------------- no server needed
def test_schedule_errors_name_the_key():
    """The recipe itself refuses a bad cron and time zone (so validate, run and schedule all do)."""
    from flows.schedule import check_schedule

    check_schedule(ScheduleConfig(cron="*/15 1-3 * * mon-fri", timezone="America/New_York"))
    with pytest.raises(RecipeError) as err:
        recipe_from_dict({"stages": [{"method": "rtn"}], "schedule": {"cron": "61 2 * * *", "timezone": "Europe/Pariss"}},
                         "p.yaml")
    assert len(err.value.problems) == 2
    cron_line, tz_line = sorted(err.value.problems)
    assert tz_line.startswith("schedule.timezone:") and "Europe/Paris" in tz_line and '"Europe/Pariss"' in tz_line
    assert cron_line.startswith("schedule.cron:") and '"61 2 * * *"' in cron_line and "minute 0-59" in cron_line
    with pytest.raises(RecipeError, match="schedule.cron"):  # valid syntax, but February 30 never comes
        recipe_from_dict({"stages": [{"method": "rtn"}], "schedule": {"cron": "0 2 30 2 *"}})


CRONS = ["0 2 * * *", "*/15 1-3 * * mon-fri", "0 2 * * 7", "0 2 L * *", "0 2 * * 1#2", "0 0 29 2 *", "0 2 * JAN *",
         "0-59/15 * * * *", "0 2 * * 0-7", "61 2 * * *", "0 24 * * *", "0 2 30 2 *", "0 2 * * 8", "0 2 * * 5L",
         "0 2 LW * *", "0 2 15W * *", "*/0 * * * *", "H 2 * * *", "0 2 0 * *", "0 2 * 13 *", "0 2 * * 1#6", "* *",
         "0 2 * * * *", "@daily", "1,,2 * * * *"]


@pytest.mark.parametrize("cron", CRONS)
def test_the_recipe_accepts_a_cron_only_where_prefect_serves_it(cron):
    """ScheduleConfig (no Prefect import) and Prefect's own Cron agree: what `validate` accepts,
    `schedule` can serve (the recipe may be stricter, never looser)."""
    from prefect.schedules import Cron
    from pydantic import ValidationError

    try:
        ScheduleConfig(cron=cron, timezone="Europe/Paris")
        ours = True
    except ValidationError:
        ours = False
    try:
        Cron(cron, timezone="Europe/Paris")
        prefects = len(cron.split()) == 5  # Prefect takes 6 fields (seconds) and @daily; the recipe wants 5
    except ValueError:
        prefects = False
    assert not ours or prefects, f"{cron!r}: the recipe accepts it, Prefect refuses it"
    if cron in CRONS[:9]:
        assert ours, f"{cron!r}: a usable cron refused"


def test_next_runs_follow_the_time_zone():
    from datetime import datetime

    from flows.schedule import next_runs

    after = datetime(2026, 1, 10, 12, 0, tzinfo=timezone.utc)
    utc = [t.astimezone(timezone.utc) for t in next_runs("30 3 * * *", "Asia/Kolkata", 2, after)]
    assert [(t.day, t.hour, t.minute) for t in utc] == [(10, 22, 0), (11, 22, 0)]  # 03:30 IST = 22:00 UTC


def test_check_prints_the_schedule_and_next_runs(capsys):
    from flows.schedule import main

    recipe = load_recipe(ROOT / "params.yaml")
    assert main(["--check", str(ROOT / "params.yaml")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"frugalflow-nightly/nightly: {recipe.schedule.cron!r} in {recipe.schedule.timezone}")
    assert len(out) == 4 and all(line.strip().startswith("next run ") for line in out[1:])
    assert main(["--check", str(ROOT / "params.yaml"), "-s", "schedule.timezone=Mars/Olympus"]) == 2
    assert "schedule.timezone" in capsys.readouterr().err


def test_serve_refuses_without_a_server():
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.schedule import main

    with temporary_settings(updates={PREFECT_API_URL: None}):
        assert main([str(ROOT / "params.yaml")]) == 4


# --------------------------------------------------------------------------- real server
def test_deployment_schedule_matches_params_yaml(api):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from flows.nightly import compression_flow
    from flows.schedule import nightly_deployment

    # as if infra/prefect.yaml had been deployed to this server first: same name, on a work pool
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="gpu", type="process"))
    pooled = compression_flow.to_deployment(name="nightly", work_pool_name="gpu").apply()
    assert read_deployment(pooled).work_pool_name == "gpu"

    recipe = load_recipe(ROOT / "params.yaml")
    deployment_id = nightly_deployment(ROOT / "params.yaml").apply()
    assert deployment_id == pooled  # the same deployment, now taken off the pool
    stored = read_deployment(deployment_id)
    assert stored.name == "nightly"
    assert len(stored.schedules) == 1 and stored.schedules[0].active and not stored.paused
    assert stored.schedules[0].schedule.cron == recipe.schedule.cron
    assert stored.schedules[0].schedule.timezone == recipe.schedule.timezone
    assert stored.parameters == {"params": str(ROOT / "params.yaml"), "overrides": []}
    assert stored.entrypoint == "flows.nightly.compression_flow" and stored.work_pool_name is None
    assert stored.global_concurrency_limit is not None and stored.global_concurrency_limit.limit == 1


@pytest.mark.xfail(SQLALCHEMY_BREAKS_SCHEDULER, strict=True, reason=f"SQLAlchemy {sqlalchemy.__version__}: Prefect "
                   "3.8.8's scheduler bulk-inserts FlowRun.state, a hybrid property, which SQLAlchemy 2.1 refuses")
def test_server_scheduler_places_runs_at_cron_times_in_the_time_zone(api, project):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from flows.schedule import FULL_NAME, next_runs, nightly_deployment

    # a fresh deployment: the server's scheduler may still be placing runs for the schedule an earlier test
    # applied under this name (params.yaml's 02:00 UTC), and those would stay on a re-applied deployment
    with get_client(sync_client=True) as client:
        try:
            client.delete_deployment(client.read_deployment_by_name(FULL_NAME).id)
        except ObjectNotFound:
            pass
    deployment_id = nightly_deployment(project / "params.yaml").apply()
    expected = [t.astimezone(timezone.utc) for t in next_runs(TINY_SCHEDULE["cron"], TINY_SCHEDULE["timezone"], 3)]
    log = api["home"] / "server.log"

    wait_for(lambda: auto_scheduled_starts(deployment_id)[:3] == expected or scheduler_errors(log), 60)
    starts = auto_scheduled_starts(deployment_id)
    assert not scheduler_errors(log), f"the server's scheduler failed:\n{tail(log, 1500)}"
    assert starts[:3] == expected, f"scheduled {starts[:3]}, expected {expected}"
    assert all((t.hour, t.minute) == (22, 0) for t in starts[:3])  # 03:30 in Kolkata, not in UTC


def test_served_deployment_runs_the_flow_to_completed(api, project, tmp_path):
    from prefect.deployments import run_deployment

    from flows.schedule import FULL_NAME, nightly_deployment

    params = (project / "params.yaml").resolve()
    deployment_id = nightly_deployment(params).apply()
    stored = read_deployment(deployment_id)
    assert (stored.schedules[0].schedule.cron, stored.schedules[0].schedule.timezone) == \
        (TINY_SCHEDULE["cron"], TINY_SCHEDULE["timezone"])

    # the serve process, as `frugalflow schedule` runs it, from an unrelated directory
    log = tmp_path / "serve.log"
    env = {**api["env"], "PREFECT_HOME": str(tmp_path / "serve-home"), "PREFECT_RUNNER_POLL_FREQUENCY": "2",
           "PYTHONPATH": str(ROOT)}
    with open(log, "w") as out:
        serve = subprocess.Popen([sys.executable, "-m", "flows.schedule", str(params)], env=env, cwd=tmp_path,
                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        started = time.monotonic()
        run = run_deployment(FULL_NAME, timeout=RUN_S, poll_interval=2)
        took = time.monotonic() - started
        assert serve.poll() is None, f"serve exited with {serve.returncode}:\n{tail(log)}"
        assert run.parameters == {"params": str(params), "overrides": []}
        assert run.deployment_id == deployment_id
        assert run.state is not None and run.state.is_completed(), \
            f"run {run.id} ended {run.state and run.state.type} after {took:.0f} s:\n{tail(log)}"
        print(f"served run {run.id} COMPLETED {took:.1f} s after it was requested")
    finally:
        stop(serve, signal.SIGINT, 90)  # a graceful stop pauses the schedule; under load it can take a while
    # the run did the work: an MLflow parent run tagged with this flow run, a registered champion
    client = client_for(project)
    experiment = client.get_experiment_by_name("tiny-sched")
    runs = client.search_runs([experiment.experiment_id], f"tags.`prefect.flow_run_id` = '{run.id}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["frugalflow.params"] == str(params)
    versions = client.search_model_versions(f"run_id = '{runs[0].info.run_id}'")
    assert [v.name for v in versions] == ["tiny-sched"]
    # serving again applies the same deployment, active. (Whether stopping `serve` paused it first
    # is Prefect's pause_on_shutdown; on a loaded machine the pause did not always land in time.)
    assert nightly_deployment(params).apply() == deployment_id and not read_deployment(deployment_id).paused
