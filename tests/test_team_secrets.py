"""No generated secret (S3 secret keys, database passwords: `team_stack.secrets`) leaks after a team
run: not in anything MLflow recorded (every row of its database: params, tags, metrics, registry),
nor in any object of the S3 buckets (run and model artifacts, the report, DVC data, published
models), nor in anything Prefect recorded (every row of its database: flow-run parameters, logs,
artifacts, deployments), nor in any file git tracks. The scan runs after the session's deployment runs
of the nightly flow on the team stack (tests/team_stack.py `nightly_runs`) and one `frugalflow run` whose
recipe names the tracking server with the member's password in the URL (`http://frugalflow:<password>@...`),
whose environment holds a canary secret and whose overrides give a webhook endpoint with a canary token
in its path and the password URL again: none appears in what was recorded (Prefect's flow-run
parameters included: flows/secret_overrides.py) nor in the command's output (URL passwords are
redacted: frugalflow/redact.py)."""
from __future__ import annotations

import secrets as pysecrets
import subprocess
import sys

import pytest
from helpers import ROOT, make_project, tiny_recipe
from team_stack import nightly_runs

pytestmark = pytest.mark.slow


def leaks(text: str, secrets: dict[str, str]) -> list[str]:
    return [name for name, value in secrets.items() if value and value in text]


def database_rows(conn) -> dict[str, str]:
    """Every row of every table of the public schema, as text, by table."""
    with conn.cursor() as cur:
        cur.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' "
                    "AND table_type = 'BASE TABLE'")
        tables = [t for (t,) in cur.fetchall()]
        rows = {}
        for table in tables:
            cur.execute(f'SELECT t::text FROM "{table}" t')
            rows[table] = "\n".join(r for (r,) in cur.fetchall())
    return rows


def completed_deployment_runs(stack) -> list:
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterDeploymentId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    with stack.prefect() as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(
            deployment_id=FlowRunFilterDeploymentId(is_null_=False),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.COMPLETED]))))


@pytest.fixture(scope="module")
def canary_run(team_stack, tiny_model_dir, tmp_path_factory):
    """`frugalflow run` with the member's password inside the recipe's tracking URI, a canary secret in
    the environment, and two more given as overrides (flow-run parameters, were they passed on as
    such): an endpoint whose path is a token (the webhook the recipe's notifications go to) and the
    tracking URI with the password again; its ({name: canary}, stdout + stderr)."""
    user, password = team_stack.team.mlflow_accounts["member"]
    uri = team_stack.mlflow_uri.replace("http://", f"http://{user}:{password}@")
    recipe = tiny_recipe(tiny_model_dir, "tiny-canary", data={"calib_windows": 4, "train_windows": 8, "eval_windows": 4},
                         evaluation={"decode_tokens": 4, "decode_race_rounds": 0}, gates={"min_size_reduction": 1.0},
                         tracking={"uri": uri})
    project = make_project(tmp_path_factory.mktemp("canary"), recipe)
    canaries = {name: "canary-" + pysecrets.token_hex(16) for name in ("environment", "endpoint")}
    env = team_stack.env(FRUGALFLOW_CANARY_SECRET=canaries["environment"], PYTHONPATH=str(ROOT))
    env.pop("MLFLOW_TRACKING_URI")  # the recipe's URL, password included, is the one used
    env.pop("MLFLOW_TRACKING_USERNAME")
    env.pop("MLFLOW_TRACKING_PASSWORD")
    overrides = ["-s", f"notify.webhook_url=http://127.0.0.1:9/hooks/{canaries['endpoint']}", "-s", f"tracking.uri={uri}"]
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", "-p", str(project / "params.yaml"), *overrides],
                          cwd=project, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "frugalflow:***@" in done.stdout + done.stderr  # the URL was shown, redacted
    return canaries, done.stdout + done.stderr


@pytest.fixture(scope="module")
def team_run(team_stack, tiny_model_dir, canary_run):
    """The completed deployment runs of the nightly flow on the team stack (the session's two,
    tests/team_stack.py `nightly_runs`, triggered here if no test did yet)."""
    nightly_runs(team_stack, tiny_model_dir)
    runs = completed_deployment_runs(team_stack)
    assert runs
    return runs


def test_no_secret_in_mlflow_prefect_s3_or_git(team_stack, team_run, canary_run):
    canaries, output = canary_run
    secrets = {**team_stack.secrets, **{f"canary in the {where}": value for where, value in canaries.items()}}
    assert {"MLFLOW_DB_PASSWORD", "PREFECT_DB_PASSWORD", "FRUGALFLOW_S3_SECRET_KEY", "MLFLOW_S3_SECRET_KEY",
            "MLFLOW_MEMBER_PASSWORD", "PREFECT_AUTH_PASSWORD", "MLFLOW_ADMIN_PASSWORD"} <= set(secrets)
    assert all(len(v) >= 16 for v in secrets.values())  # generated, not guessable placeholders
    found = {}
    if hit := leaks(output, secrets):
        found["the canary run's output"] = hit

    # MLflow: every row of its database, and it holds the team run's params, tags and metrics
    with team_stack.sql("mlflow") as conn:
        mlflow_rows = database_rows(conn)
    assert str(team_run[0].id) in mlflow_rows["tags"]  # the flow run's MLflow run is there (prefect.flow_run_id)
    assert "frugalflow:***@" in mlflow_rows["params"]  # the canary run's tracking.uri param, redacted
    assert mlflow_rows["params"] and mlflow_rows["metrics"]
    for table, text in mlflow_rows.items():
        if hit := leaks(text, secrets):
            found[f"mlflow table {table}"] = hit

    # Prefect: every row of its database: flow-run parameters, logs, artifacts, deployments, ...
    with team_stack.sql("prefect") as conn:
        prefect_rows = database_rows(conn)
    assert str(team_run[0].id) in prefect_rows["flow_run"] and prefect_rows["log"]
    for table, text in prefect_rows.items():
        if hit := leaks(text, secrets):
            found[f"prefect table {table}"] = hit

    # S3: every object of every bucket (run and model artifacts, the report, DVC data, published models)
    n_objects, reports = 0, 0
    for role, bucket in team_stack.buckets.items():
        s3 = team_stack.s3("mlflow" if role == "mlflow" else "worker")  # each bucket with the key that reaches it
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", []):
                body = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
                n_objects += 1
                reports += obj["Key"].endswith("report/report.md")
                if hit := leaks(body.decode("latin-1"), secrets):
                    found[f"s3://{bucket}/{obj['Key']}"] = hit
    assert reports >= 1 and n_objects > reports  # the scan saw the report and the model files

    # every file git tracks in this checkout
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, tracked.decode().split("\0")):
        path = ROOT / rel
        if path.is_file() and (hit := leaks(path.read_bytes().decode("latin-1"), secrets)):
            found[f"git-tracked {rel}"] = hit

    assert not found, f"secrets found (variable names only): {found}"
