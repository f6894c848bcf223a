"""Team services dying in the middle of a deployment run (the team stack, tests/team_stack.py), each
for real: PostgreSQL restarted, the MLflow server SIGKILLed and brought back by `team up`, the object
store SIGKILLed and brought back. Each time the run, already past its first stage, rides out the
outage (MLflow's client retries with back-off; the server reconnects to its database) and completes:
one version registered, its files whole, no run left RUNNING."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from helpers import make_project, tail, tiny_recipe, wait_for

pytestmark = pytest.mark.slow


def start_deployment_run(stack, project: Path):
    with stack.prefect() as client:
        deployment = client.read_deployment_by_name("frugalflow-nightly/nightly")
        return client.create_flow_run_from_deployment(deployment.id, parameters={"params": str(project / "params.yaml")}).id


def final_state(stack, flow_run_id, timeout: float = 900):
    from prefect.exceptions import PrefectHTTPStatusError

    def final():
        with stack.prefect() as client:
            try:
                run = client.read_flow_run(flow_run_id)
            except PrefectHTTPStatusError:
                return None
        return run if run.state and run.state.is_final() else None

    return wait_for(final, timeout, 2)


def first_stage_done(stack, name: str) -> bool:
    """The night's first stage run FINISHED: the run is in its compression stages."""
    from mlflow import MlflowClient

    client = MlflowClient(stack.mlflow_uri)
    try:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            return False
        return bool(client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'", max_results=1))
    except Exception:  # noqa: BLE001 - the server may be busy
        return False


def project_for(stack, tiny_model_dir, name: str) -> Path:
    folder = stack.home / "outage-projects" / name
    folder.mkdir(parents=True)
    recipe = tiny_recipe(tiny_model_dir, name, data={"calib_windows": 4, "train_windows": 8, "eval_windows": 4},
                         evaluation={"decode_tokens": 4, "decode_race_rounds": 0}, gates={"min_size_reduction": 1.0})
    recipe["stages"][-1] = {**recipe["stages"][-1], "steps": 12}  # a few seconds of distillation to fall into
    return make_project(folder, recipe)


def completed_cleanly(stack, flow_run, name: str) -> None:
    from mlflow import MlflowClient

    assert flow_run is not None, f"not final; worker log:\n{tail(stack.logs / 'worker.log')}"
    assert flow_run.state.is_completed(), f"{flow_run.state.type}: {flow_run.state.message}\n{tail(stack.logs / 'worker.log')}"
    client = MlflowClient(stack.mlflow_uri)
    experiment = client.get_experiment_by_name(name)
    assert not client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'")
    versions = client.search_model_versions(f"name = '{name}'")
    assert len(versions) == 1
    champion = client.get_model_version_by_alias(name, "champion")
    files = client.list_artifacts(champion.run_id, "serving")
    assert files, "no serving files attached to the champion"


@pytest.fixture
def outage(team_stack, tiny_model_dir, request):
    """A deployment run of a fresh project (model name from the test) started, waited on until its
    first stage finished; yields (project name, flow run id); `team up` afterwards in any case."""
    name = "tiny-outage-" + request.node.name.split("_")[5]  # postgresql, mlflow, object
    project = project_for(team_stack, tiny_model_dir, name)
    flow_run_id = start_deployment_run(team_stack, project)
    assert wait_for(lambda: first_stage_done(team_stack, name), 600, 1), tail(team_stack.logs / "worker.log")
    try:
        yield name, flow_run_id
    finally:
        team_stack.start()


def test_run_rides_out_a_postgresql_restart(team_stack, outage):
    from tasks.team import postgres

    name, flow_run_id = outage
    bindir = postgres.find_bindir()
    postgres.stop(team_stack.team, bindir)
    time.sleep(5)
    postgres.start(team_stack.team, bindir)
    completed_cleanly(team_stack, final_state(team_stack, flow_run_id), name)


def test_run_rides_out_the_mlflow_server_killed(team_stack, outage):
    name, flow_run_id = outage
    os.killpg(team_stack.status()["mlflow"]["pid"], signal.SIGKILL)  # the server and its workers, as a container dies
    time.sleep(5)
    team_stack.start()  # what a supervisor (compose `restart:`, Kubernetes) does
    completed_cleanly(team_stack, final_state(team_stack, flow_run_id), name)


def test_run_rides_out_the_object_store_killed(team_stack, outage):
    name, flow_run_id = outage
    os.killpg(team_stack.status()["s3"]["pid"], signal.SIGKILL)
    time.sleep(5)
    team_stack.start()
    completed_cleanly(team_stack, final_state(team_stack, flow_run_id), name)
