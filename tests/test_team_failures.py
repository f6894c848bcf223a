"""Team services failing, for real, before any heavy work (tasks/preflight.py): `frugalflow run`
exits 4 naming the service, its address and what to do, and records nothing, when the MLflow
server is down, when its database refuses its password, when S3 refuses our key (the team's S3,
which checks keys), or when the DVC bucket is missing or out of the key's reach; a work pool without a live worker is named
as such. The team stack (tests/team_stack.py) provides PostgreSQL, S3, MLflow and Prefect."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import free_port, make_project, tiny_recipe

from tasks.lineage import REMOTE_ENV

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir) -> Path:
    return make_project(tmp_path_factory.mktemp("failing"), tiny_recipe(tiny_model_dir, "tiny-team-failures"))


def run_cli(project: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", "run", "-p", str(project / "params.yaml")],
                          cwd=project, env=env, capture_output=True, text=True, timeout=600)


def nothing_done(project: Path) -> None:
    """No DVC stage ran and no stage output exists: the run stopped before any heavy work."""
    assert not (project / "models").exists() and not (project / "data").exists()
    assert not (project / "artifacts").exists()


def no_experiment(stack, name: str = "tiny-team-failures") -> None:
    from mlflow import MlflowClient

    assert MlflowClient(tracking_uri=stack.mlflow_uri).get_experiment_by_name(name) is None


def test_mlflow_server_down(team_stack, project):
    address = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    done = run_cli(project, team_stack.env(MLFLOW_TRACKING_URI=address))
    assert done.returncode == 4, done.stderr[-3000:]
    assert f"MLflow tracking server at {address}" in done.stderr and "frugalflow team status" in done.stderr
    assert "Traceback" not in done.stderr
    nothing_done(project)


def test_dvc_bucket_missing(team_stack, project):
    done = run_cli(project, team_stack.env(**{REMOTE_ENV: "s3://no-such-bucket-t2/dvc"}))
    assert done.returncode == 4, done.stderr[-3000:]
    assert "'no-such-bucket-t2'" in done.stderr and team_stack.s3_endpoint in done.stderr
    # the worker's key reaches its own buckets only: S3 answers "access denied" for any other, existing or not
    assert "access denied" in done.stderr, done.stderr
    nothing_done(project)
    no_experiment(team_stack)


@pytest.fixture(scope="module")
def s3_with_auth(team_stack):
    """The team's S3 API, which checks keys: its endpoint and the worker's access key."""
    access, secret = team_stack.team.s3_key("worker")
    return {"url": team_stack.s3_endpoint, "access": access, "secret": secret}


def test_s3_wrong_secret_key(team_stack, project, s3_with_auth):
    from tasks.preflight import check_bucket

    s3 = {"AWS_ENDPOINT_URL": s3_with_auth["url"], "FRUGALFLOW_S3_ENDPOINT": s3_with_auth["url"],
          "AWS_ACCESS_KEY_ID": s3_with_auth["access"], REMOTE_ENV: "s3://frugalflow-dvc/x"}
    done = run_cli(project, team_stack.env(**s3, AWS_SECRET_ACCESS_KEY="not-the-secret"))
    assert done.returncode == 4, done.stderr[-3000:]
    assert f"S3 at {s3_with_auth['url']} refused the DVC remote" in done.stderr, done.stderr[-2000:]
    assert "access denied" in done.stderr and "AWS_SECRET_ACCESS_KEY" in done.stderr
    assert "not-the-secret" not in done.stderr
    nothing_done(project)
    no_experiment(team_stack)
    # the right key passes the same check (the refusal was the key's, not the server's)
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {**s3, "AWS_SECRET_ACCESS_KEY": s3_with_auth["secret"]}.items():
            mp.setenv(name, value)
        check_bucket("s3://frugalflow-dvc/x", "the DVC remote")


def test_mlflow_database_refuses_password(team_stack, project):
    """The team's tracking server is up, but its database role's password was changed under it
    (sessions cut, so the server must log in again); the password is put back afterwards."""
    import psycopg2

    pg = team_stack.pg
    admin = psycopg2.connect(host=pg["host"], port=pg["port"], user=pg["admin_user"], password=pg["admin_password"],
                             dbname="postgres")
    admin.autocommit = True
    role = pg["mlflow"]["user"]
    try:
        with admin.cursor() as cur:
            cur.execute(f'ALTER ROLE "{role}" PASSWORD %s', ("not-the-servers-password",))
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,))
        done = run_cli(project, team_stack.env())
        assert done.returncode == 4, done.stderr[-3000:]
        assert f"MLflow tracking server at {team_stack.mlflow_uri} is up but cannot serve requests" in done.stderr
        assert "database" in done.stderr and "Traceback" not in done.stderr
        nothing_done(project)
    finally:
        with admin.cursor() as cur:
            cur.execute(f'ALTER ROLE "{role}" PASSWORD %s', (pg["mlflow"]["password"],))
        admin.close()
    no_experiment(team_stack)  # the server answers again, and nothing was recorded


def test_work_pool_without_worker(team_stack):
    from prefect.client.schemas.actions import WorkPoolCreate

    from frugalflow.errors import exit_code_of
    from tasks.preflight import ServiceDown, check_work_pool

    assert check_work_pool(team_stack.prefect_api, team_stack.work_pool)["workers"]  # the team's worker
    with team_stack.prefect() as client:
        client.create_work_pool(WorkPoolCreate(name="nobody-polls", type="process"))
    with pytest.raises(ServiceDown) as info:
        check_work_pool(team_stack.prefect_api, "nobody-polls")
    message = str(info.value)
    assert "'nobody-polls'" in message and team_stack.prefect_api in message and "no live worker" in message
    assert "prefect worker start --pool nobody-polls" in message and exit_code_of(info.value) == 4
    with pytest.raises(ServiceDown, match="does not exist"):
        check_work_pool(team_stack.prefect_api, "no-such-pool")
    down = f"http://127.0.0.1:{free_port()}/api"
    with pytest.raises(ServiceDown, match=f"Prefect API at {down}"):
        check_work_pool(down, "gpu")
