"""The servers of local team mode and what lives in them: the MLflow tracking server (PostgreSQL,
artifacts proxied to S3), the Prefect server (PostgreSQL), its `gpu` work pool and GPU concurrency
limit, the nightly deployment from infra/prefect.yaml, and a worker polling the pool.

Both servers ask for credentials: MLflow runs its basic-auth app (accounts in its PostgreSQL
database; `ensure_mlflow_accounts` creates the member and reader logins as the admin), Prefect its
API login (PREFECT_SERVER_API_AUTH_STRING). Secrets reach the servers through their environment
(PGPASSWORD, the connection URL variable, the admin password), never their command line, so `ps`
shows none. Only the MLflow server gets the MLflow bucket key and the admin password.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from tasks.team import procs
from tasks.team.accounts import ensure_accounts
from tasks.team.config import Team, TeamError

CLEAN_PREFIXES = ("AWS_", "MLFLOW_", "PREFECT_", "PG", "FRUGALFLOW_S3", "FRUGALFLOW_GPU")


def base_env() -> dict[str, str]:
    """This process's environment without any service setting a caller may have exported."""
    return {k: v for k, v in os.environ.items() if not k.startswith(CLEAN_PREFIXES)}


# --------------------------------------------------------------------------- MLflow
def write_mlflow_auth_config(team: Team, store: str) -> Path:
    """The basic-auth app's settings (MLFLOW_AUTH_CONFIG_PATH): its accounts in the tracking database
    (the password comes from PGPASSWORD), the admin's name; the admin password stays in the environment."""
    auth = team.spec["mlflow"]["auth"]
    path = team.home / auth["config"]
    path.write_text(f"[mlflow]\ndefault_permission = {auth['default_permission']}\ndatabase_uri = {store}\n"
                    f"admin_username = {auth['admin']['user']}\n"
                    "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    return path


def start_mlflow(team: Team) -> int:
    pg, (access, secret) = team.pg, team.s3_key("mlflow")
    auth = team.spec["mlflow"]["auth"]
    store = f"postgresql://{pg['mlflow']['user']}@{pg['host']}:{pg['port']}/{pg['mlflow']['dbname']}"
    env = {**base_env(), "PGPASSWORD": pg["mlflow"]["password"], "MLFLOW_S3_ENDPOINT_URL": team.s3_endpoint,
           "AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1",
           # the GenAI job runner (seven huey consumer processes) serves nothing frugalflow uses
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "MLFLOW_AUTH_CONFIG_PATH": str(write_mlflow_auth_config(team, store)),
           "MLFLOW_AUTH_ADMIN_PASSWORD": team.mlflow_accounts["admin"][1],  # used once, on an empty user store
           "MLFLOW_FLASK_SERVER_SECRET_KEY": team.env[auth["flask_secret_var"]]}
    cmd = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--backend-store-uri", store,
           "--serve-artifacts", "--artifacts-destination", f"s3://{team.buckets['mlflow']}/", "--host", team.host,
           "--port", str(team.port("mlflow")), "--workers", "1"]
    return procs.start(cmd, env=env, log=team.logs() / "mlflow.log", cwd=team.home)


def ensure_mlflow_accounts(team: Team) -> None:
    """As the admin: the member and reader accounts exist with the env file's passwords."""
    accounts = dict(team.mlflow_accounts)
    ensure_accounts(team.mlflow_uri, accounts.pop("admin"), accounts)


def mlflow_healthy(team: Team) -> bool:
    return procs.http_ok(team.mlflow_uri + team.spec["mlflow"]["health"])


# --------------------------------------------------------------------------- Prefect server
def start_prefect(team: Team) -> int:
    pg = team.pg
    home = team.home / "prefect-server"
    home.mkdir(parents=True, exist_ok=True)
    url = (f"postgresql+asyncpg://{pg['prefect']['user']}:{pg['prefect']['password']}@{pg['host']}:{pg['port']}"
           f"/{pg['prefect']['dbname']}")
    env = {**base_env(), "PREFECT_HOME": str(home), "PREFECT_API_DATABASE_CONNECTION_URL": url,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "true",
           "PREFECT_SERVER_UI_API_URL": team.prefect_api, "PREFECT_LOGGING_SERVER_LEVEL": "WARNING",
           "PREFECT_SERVER_API_AUTH_STRING": team.prefect_auth}
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", team.host, "--port", str(team.port("prefect"))]
    return procs.start(cmd, env=env, log=team.logs() / "prefect-server.log", cwd=home)


def prefect_healthy(team: Team) -> bool:
    return procs.http_ok(team.url("prefect") + team.spec["prefect"]["health"])


def prefect_client(team: Team):
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(team.prefect_api, auth_string=team.prefect_auth)


def ensure_pool_and_limit(team: Team) -> None:
    """The process-type work pool (Prefect's default job template) and the GPU concurrency limit."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    pool, limit = team.spec["prefect"]["work_pool"], team.spec["prefect"]["gpu_limit"]
    with prefect_client(team) as client:
        try:
            client.read_work_pool(pool["name"])
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool["name"], type=pool["type"],
                                                   base_job_template=ProcessWorker.get_default_base_job_template()))
        try:
            client.read_global_concurrency_limit_by_name(limit["name"])
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit["name"],
                                                                                limit=limit["slots"]))


def worker_env(team: Team) -> dict[str, str]:
    """What the worker and its flow runs see: the client variables and where the project is."""
    return {**base_env(), **team.client_env(), "PREFECT_API_URL": team.prefect_api,
            team.spec["worker"]["project_dir_var"]: str(team.project_dir)}


def deploy(team: Team, timeout: float = 240) -> None:
    """`prefect deploy` of the nightly deployment from infra/prefect.yaml, as a person would run it."""
    dep = team.spec["prefect"]["deployment"]
    env = {**worker_env(team), "PREFECT_HOME": str(team.home / "client")}
    env.pop(team.spec["worker"]["project_dir_var"])  # stays a placeholder: the worker fills it in per run
    log = team.logs() / "deploy.log"
    with open(log, "ab") as out:
        done = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--prefect-file",
                               str(team.project_dir / dep["file"]), "--name", dep["name"]], env=env,
                              cwd=team.project_dir, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    if done.returncode != 0:
        raise TeamError(f"`prefect deploy` of {dep['file']} ({dep['name']}) against {team.prefect_api} failed "
                        f"({done.returncode}); its log {log} ends:\n{procs.tail(log)}")


def deployment_fingerprint(team: Team) -> str:
    """What the deployment is made of: prefect.yaml's content and the server it went to."""
    import hashlib

    dep = team.spec["prefect"]["deployment"]
    content = (team.project_dir / dep["file"]).read_bytes() + team.prefect_api.encode()
    return hashlib.sha256(content).hexdigest()


def deployment_exists(team: Team) -> bool:
    from prefect.exceptions import ObjectNotFound

    dep = team.spec["prefect"]["deployment"]
    with prefect_client(team) as client:
        try:
            client.read_deployment_by_name(f"{dep['flow']}/{dep['name']}")
            return True
        except ObjectNotFound:
            return False


def worker_name(team: Team) -> str:
    return f"team-{socket.gethostname()}-{team.port('prefect')}"


def start_worker(team: Team) -> int:
    home = team.home / "worker"
    home.mkdir(parents=True, exist_ok=True)
    env = {**worker_env(team), "PREFECT_HOME": str(home), "PREFECT_WORKER_QUERY_SECONDS": "2",
           "PREFECT_WORKER_HEARTBEAT_SECONDS": "10"}
    cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", team.work_pool, "--type",
           team.spec["prefect"]["work_pool"]["type"], "--name", worker_name(team)]
    return procs.start(cmd, env=env, log=team.logs() / "worker.log", cwd=team.project_dir)


def worker_online(team: Team, since: float = 0.0) -> bool:
    """The worker has sent a heartbeat to the server (after `since`, a Unix time)."""
    with prefect_client(team) as client:
        workers = client.read_workers_for_work_pool(team.work_pool)
    return any(w.name == worker_name(team) and str(getattr(w.status, "value", w.status)).upper() == "ONLINE"
               and w.last_heartbeat_time is not None and w.last_heartbeat_time.timestamp() >= since
               for w in workers)
