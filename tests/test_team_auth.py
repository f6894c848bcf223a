"""Team mode asks who is calling (the `team_stack` fixture: `frugalflow team up`, real servers): the
MLflow server (its basic-auth app) and the Prefect server (its API login) refuse requests without a
login or with a wrong one, and an alias cannot be moved anonymously; the read-only account of
reader.env browses the registry but its `frugalflow promote` and `rollback` exit 4 naming the
account and the permission, leaving the champion where it was; the member account of client.env
promotes. The browser logins are in tests/test_team_e2e.py."""
from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest
from helpers import ROOT

pytestmark = pytest.mark.slow


def shell_env(login: dict[str, str]) -> dict[str, str]:
    """A shell that sourced only `login` (e.g. reader.env)."""
    from tasks.team.servers import base_env

    return {**base_env(), "PYTHONPATH": str(ROOT), **login}


def frugalflow(args: list[str], env: dict[str, str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def model(team_stack):
    """A registered model of two versions made by the member account, champion 1 -> 2 (history kept)."""
    from mlflow import MlflowClient

    from tasks.registry import promote

    client = MlflowClient(team_stack.mlflow_uri, team_stack.mlflow_uri)  # this process logs in as the member
    name = f"auth-{os.getpid()}"
    run = client.create_run(client.create_experiment(name)).info.run_id
    client.create_registered_model(name)
    for _ in range(2):
        client.create_model_version(name, f"runs:/{run}/model", run)
    promote(client, name, "1", "first", by="test")
    promote(client, name, "2", "second", by="test")
    return name


def test_every_service_refuses_requests_without_a_login(team_stack, model):
    mlflow, prefect = team_stack.mlflow_uri, team_stack.prefect_api
    search = {"max_results": 1}
    for auth in (None, ("frugalflow", "not-the-password"), ("reader", team_stack.team.mlflow_accounts["member"][1])):
        assert httpx.post(f"{mlflow}/api/2.0/mlflow/experiments/search", json=search, auth=auth).status_code == 401
    for auth in (None, ("frugalflow", "not-the-password")):
        assert httpx.post(f"{prefect}/flows/filter", json={}, auth=auth).status_code == 401
        assert httpx.post(f"{prefect}/deployments/filter", json={}, auth=auth).status_code == 401
    # health checks stay open (orchestrators probe them); the right logins are let in
    assert httpx.get(f"{mlflow}/health").status_code == 200 and httpx.get(f"{prefect}/health").status_code == 200
    assert httpx.post(f"{mlflow}/api/2.0/mlflow/experiments/search", json=search,
                      auth=team_stack.team.mlflow_accounts["reader"]).status_code == 200
    user, password = team_stack.team.prefect_auth.split(":", 1)
    assert httpx.post(f"{prefect}/flows/filter", json={}, auth=(user, password)).status_code == 200
    # nobody moves the champion anonymously
    moved = httpx.post(f"{mlflow}/api/2.0/mlflow/registered-models/alias",
                       json={"name": model, "alias": "champion", "version": "1"})
    assert moved.status_code == 401
    from mlflow import MlflowClient

    assert MlflowClient(mlflow, mlflow).get_registered_model(model).aliases["champion"] == "2"


def test_read_only_account_browses_but_cannot_promote_or_roll_back(team_stack, model, tmp_path):
    from mlflow import MlflowClient

    reader = shell_env(team_stack.team.reader_env())
    user, password = team_stack.team.mlflow_accounts["reader"]
    as_reader = httpx.Client(auth=(user, password), base_url=team_stack.mlflow_uri)
    got = as_reader.get("/api/2.0/mlflow/registered-models/get", params={"name": model})
    assert got.status_code == 200 and got.json()["registered_model"]["name"] == model  # browses
    for args in (["promote", "1", "--reason", "reader tries"], ["rollback", "--reason", "reader tries"]):
        done = frugalflow([*args, "--model", model], reader, tmp_path)
        assert done.returncode == 4, done.stdout + done.stderr
        assert f"account '{user}' lacks the permission" in done.stderr and "PERMISSION_DENIED" in done.stderr
        assert password not in done.stdout + done.stderr
    # deleting and managing accounts are refused as well
    assert as_reader.request("DELETE", "/api/2.0/mlflow/model-versions/delete",
                             json={"name": model, "version": "2"}).status_code == 403
    assert as_reader.post("/api/2.0/mlflow/users/create", json={"username": "x", "password": "y" * 12}).status_code == 403
    client = MlflowClient(team_stack.mlflow_uri, team_stack.mlflow_uri)
    assert client.get_registered_model(model).aliases["champion"] == "2"
    assert len(client.search_model_versions(f"name = '{model}'")) == 2
    # the member account of client.env may: the refusal was the permission, not the command
    member = shell_env(team_stack.member_login | {"MLFLOW_TRACKING_URI": team_stack.mlflow_uri})
    done = frugalflow(["rollback", "--reason", "member rolls back", "--model", model], member, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert client.get_registered_model(model).aliases["champion"] == "1"
