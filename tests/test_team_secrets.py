"""No generated secret (S3 secret keys, database passwords: `team_stack.secrets`) leaks after a team
run: not in anything MLflow recorded (every row of its database: params, tags, metrics, registry),
nor in any object of the S3 buckets (run and model artifacts, the report, DVC data, published
models), nor in anything Prefect recorded (every row of its database: flow-run parameters, logs,
artifacts, deployments), nor in any file git tracks. The scan runs after the session's deployment runs
of the nightly flow on the team stack (tests/team_stack.py `nightly_runs`)."""
from __future__ import annotations

import subprocess

import pytest
from helpers import ROOT
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
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterDeploymentId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    with SyncPrefectClient(stack.prefect_api) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(
            deployment_id=FlowRunFilterDeploymentId(is_null_=False),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.COMPLETED]))))


@pytest.fixture(scope="module")
def team_run(team_stack, tiny_model_dir):
    """The completed deployment runs of the nightly flow on the team stack (the session's two,
    tests/team_stack.py `nightly_runs`, triggered here if no test did yet)."""
    nightly_runs(team_stack, tiny_model_dir)
    runs = completed_deployment_runs(team_stack)
    assert runs
    return runs


def test_no_secret_in_mlflow_prefect_s3_or_git(team_stack, team_run):
    secrets = team_stack.secrets
    assert {"MLFLOW_DB_PASSWORD", "PREFECT_DB_PASSWORD", "FRUGALFLOW_S3_SECRET_KEY", "MLFLOW_S3_SECRET_KEY"} <= set(secrets)
    assert all(len(v) >= 16 for v in secrets.values())  # generated, not guessable placeholders
    found = {}

    # MLflow: every row of its database, and it holds the team run's params, tags and metrics
    with team_stack.sql("mlflow") as conn:
        mlflow_rows = database_rows(conn)
    assert str(team_run[0].id) in mlflow_rows["tags"]  # the flow run's MLflow run is there (prefect.flow_run_id)
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
