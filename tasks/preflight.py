"""Before any heavy work: every service the run will talk to answers, accepts our credentials and
has what the run needs; otherwise `ServiceDown` (a ConnectionError: exit code 4) naming the
service, its address, what it answered and what to do, and nothing is recorded yet.

    client = preflight(root, tracking_uri)   # flows/project.py, before the run's MLflow run exists

Checked: the MLflow store (a server: its /health, then an API call, which reaches its database);
the S3 buckets the run will use (the DVC remote of tasks/lineage.py, the models bucket of
tasks/promote.py): reachable, credentials accepted, bucket present; the Prefect API when one is
set. `check_work_pool` tells whether a pool has a live worker (for a deployment trigger).
"""
from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import httpx

from frugalflow.redact import redact

TIMEOUT_S = 5
TEAM_HINT = "`frugalflow team status` shows the team services"


class ServiceDown(ConnectionError):
    """A service the run needs cannot be reached or refuses (exit code 4); URL passwords redacted."""

    exit_code = 4

    def __init__(self, message: str):
        super().__init__(redact(message))


def _get(url: str, auth: tuple[str, str] | None = None) -> httpx.Response | Exception:
    try:
        return httpx.get(url, timeout=TIMEOUT_S, auth=auth)
    except httpx.HTTPError as exc:
        return exc


def mlflow_login() -> tuple[str, str] | None:
    """The MLflow account of this environment (MLFLOW_TRACKING_USERNAME / _PASSWORD), as MLflow's client
    sends it."""
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    return (user, password) if user and password else None


def check_mlflow(uri: str):
    """The MlflowClient for `uri` once the store answers a real request."""
    from tasks import tracking as T

    if uri.startswith(("http://", "https://")):
        base = uri.rstrip("/")
        health = _get(f"{base}/health")
        if isinstance(health, Exception):
            raise ServiceDown(f"MLflow tracking server at {base} (MLFLOW_TRACKING_URI / tracking.uri) cannot be "
                              f"reached: {type(health).__name__}: {health}. Start it ({TEAM_HINT}) or point "
                              "MLFLOW_TRACKING_URI at the running server.")
        if health.status_code != 200:
            raise ServiceDown(f"MLflow tracking server at {base} answered {health.status_code} on /health: "
                              f"{health.text[:200]!r}. Check the server's log ({TEAM_HINT}).")
        api = _get(f"{base}/api/2.0/mlflow/experiments/search?max_results=1", mlflow_login())
        if isinstance(api, Exception) or api.status_code >= 500:
            found = f"{type(api).__name__}: {api}" if isinstance(api, Exception) else \
                f"{api.status_code} {api.text[:300]!r}"
            raise ServiceDown(f"MLflow tracking server at {base} is up but cannot serve requests ({found}): it "
                              "cannot use its database (is PostgreSQL up, is the server's database password "
                              f"right?). See the server's log; {TEAM_HINT}.")
        if api.status_code in (401, 403):
            login = mlflow_login()
            who = f"the login of account {login[0]!r}" if login else "a request without a login"
            raise ServiceDown(f"MLflow tracking server at {base} refused {who} ({api.status_code}): set "
                              "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (team mode: source the team's "
                              "client.env) or ask an admin for access.")
    try:
        return T.connect(uri, quick=True)
    except ConnectionError as exc:
        raise ServiceDown(str(exc)) from None


def check_bucket(s3_uri: str, what: str) -> None:
    """`s3://bucket[/prefix]` is reachable with our credentials and the bucket exists."""
    from tasks import storage as S

    bucket, _ = S.parse_s3_uri(s3_uri)
    client = S.s3_client(quick=True)
    endpoint = client.meta.endpoint_url
    try:
        S._check_bucket(client, bucket, f"checking {what}")
    except S.BucketNotFound:
        raise ServiceDown(f"S3 bucket {bucket!r} ({what}, {s3_uri}) does not exist at {endpoint}: create it "
                          "(`frugalflow team up` creates the team's buckets) or fix the URI.") from None
    except S.StorageError as exc:
        raise ServiceDown(f"S3 at {endpoint} refused {what} ({s3_uri}): {exc}. Check AWS_ENDPOINT_URL, "
                          f"AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (the team's client env file).") from None


def check_prefect(api: str) -> None:
    health = _get(f"{api.rstrip('/')}/health")
    if isinstance(health, Exception) or health.status_code != 200:
        found = f"{type(health).__name__}: {health}" if isinstance(health, Exception) else health.status_code
        raise ServiceDown(f"Prefect API at {api} (PREFECT_API_URL) does not answer ({found}): start the Prefect "
                          f"server ({TEAM_HINT}) or unset PREFECT_API_URL to run on the embedded API.")


def check_work_pool(api: str, pool: str, heartbeat_s: float = 120) -> dict:
    """The pool exists and a worker polled it within `heartbeat_s`; its workers otherwise an error."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings

    check_prefect(api)
    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            raise ServiceDown(f"work pool {pool!r} does not exist at the Prefect API {api}: create it "
                              f"(`prefect work-pool create {pool} --type process`, or {TEAM_HINT}).") from None
        workers = client.read_workers_for_work_pool(pool)
    now = dt.datetime.now(dt.timezone.utc)
    alive = [w for w in workers if w.last_heartbeat_time and (now - w.last_heartbeat_time).total_seconds() < heartbeat_s]
    if not alive:
        raise ServiceDown(f"work pool {pool!r} at the Prefect API {api} has no live worker ({len(workers)} known, "
                          f"none polled in the last {heartbeat_s:.0f} s): a triggered run would wait forever. "
                          f"Start one: `prefect worker start --pool {pool}` ({TEAM_HINT}).")
    return {"pool": pool, "workers": [w.name for w in alive]}


def preflight(root: Path, tracking_uri: str):
    """Every check that applies to a run of the project at `root`; the MlflowClient."""
    from tasks.gpu_slot import api_url
    from tasks.lineage import shared_remote
    from tasks.promote import MODELS_URI_ENV

    api = api_url()
    if api:
        check_prefect(api)
    client = check_mlflow(tracking_uri)
    remote = shared_remote(root)  # ValueError (exit 2) for a FRUGALFLOW_DVC_REMOTE that names nothing
    if remote:
        check_bucket(remote[2], "the DVC remote")
    models = os.environ.get(MODELS_URI_ENV, "").strip()
    if models:
        check_bucket(models, f"the models bucket ({MODELS_URI_ENV})")
    return client


def preflight_recipe(recipe, root: Path):
    """`preflight` for a recipe the CLI validated (recipe_io.load_recipe), before Prefect starts: a
    service that is down ends the command with one line and exit 4, and no flow run is created."""
    from tasks import tracking as T

    return preflight(root, T.resolve_uri(recipe.tracking.uri, root))
