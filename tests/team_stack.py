"""The local team stack for tests: `start_team(home)` runs the same code as `frugalflow team up`
(tasks/team/stack.py) on free loopback ports with its state under `home`, and returns a `TeamStack`
with the addresses, buckets, client environment, generated secrets and PostgreSQL logins.

The session-scoped `team_stack` fixture (tests/conftest.py) starts one for the whole test session
on first use and stops it (`team down`) at the end. `TeamStack.nightly_runs` triggers the session's
two deployment runs of the nightly flow once (at the same time, picked up by the team's worker) and
hands the same finished runs to every test that reads what they left."""
from __future__ import annotations

import os
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from helpers import ROOT, free_port, make_project, tail, tiny_recipe, wait_for

from tasks.team import stack as team_stack
from tasks.team.config import SERVICES, Team, open_team


def _reachable_by_others(home: Path) -> None:
    """As root, PostgreSQL runs as `postgres`, which must reach `home`: give o+x to the folders of
    our own above it inside the temporary directory (pytest makes them 0700)."""
    if os.geteuid() != 0:
        return
    tmp = Path(tempfile.gettempdir()).resolve()
    for folder in [home, *home.parents]:
        if folder == tmp or tmp not in folder.parents:
            break
        mode = folder.stat().st_mode
        if folder.stat().st_uid == os.geteuid() and not mode & stat.S_IXOTH:
            folder.chmod(mode | stat.S_IXOTH | stat.S_IROTH)


@dataclass
class TeamStack:
    home: Path
    project_root: Path
    ports: dict[str, int]
    team: Team = field(repr=False)
    up_seconds: float = 0.0
    _runs: dict | str | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ the contract's fields
    @property
    def mlflow_uri(self) -> str:
        return self.team.mlflow_uri

    @property
    def prefect_api(self) -> str:
        return self.team.prefect_api

    @property
    def s3_endpoint(self) -> str:
        return self.team.s3_endpoint

    @property
    def buckets(self) -> dict[str, str]:
        return self.team.buckets

    @property
    def client_env(self) -> dict[str, str]:
        return self.team.client_env()

    @property
    def secrets(self) -> dict[str, str]:
        return self.team.secrets

    @property
    def pg(self) -> dict:
        return self.team.pg

    @property
    def work_pool(self) -> str:
        return self.team.work_pool

    @property
    def gpu_limit(self) -> str:
        return self.team.gpu_limit

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    # ------------------------------------------------------------------ control
    def start(self) -> "TeamStack":
        """`team up` (again): same home, same ports; the seconds it took in `up_seconds`."""
        started = time.monotonic()
        team_stack.up(self.home, self.project_root, self.ports, log=lambda line: print(line, flush=True))
        self.up_seconds = time.monotonic() - started
        self.team = open_team(self.home, self.project_root, create=False)
        return self

    def stop(self) -> list[dict]:
        """`team down`."""
        return team_stack.down(self.home, self.project_root, log=lambda line: print(line, flush=True))

    def status(self) -> dict[str, dict]:
        """`team status` rows by service (postgres, s3, mlflow, prefect, worker)."""
        return {row["service"]: row for row in team_stack.status(self.home, self.project_root)}

    # ------------------------------------------------------------------ clients
    @property
    def member_login(self) -> dict[str, str]:
        """The member's logins as client.env gives them (MLflow account, Prefect API login)."""
        keys = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING")
        return {k: self.client_env[k] for k in keys}

    def prefect(self):
        """A Prefect client of the team's server, logged in."""
        from tasks.team.servers import prefect_client

        return prefect_client(self.team)

    def env(self, **extra: str) -> dict[str, str]:
        """This process's environment without service settings, plus the team's client env."""
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("AWS_", "MLFLOW_", "PREFECT_", "FRUGALFLOW_S3", "FRUGALFLOW_GPU"))}
        return {**base, **self.client_env, **extra}

    def s3(self, client: str = "worker"):
        """boto3 S3 client with the `worker` key (dvc, models) or the `mlflow` key (server's bucket)."""
        from tasks.team import s3

        return s3.client(self.team, self.team.s3_key(client))

    def sql(self, db: str = "mlflow"):
        """A psycopg2 connection to the service's database, as its own role."""
        from tasks.team import postgres

        login = self.pg[db]
        return postgres.connect(self.team, login["dbname"], login["user"], login["password"])


NIGHTLY_MODEL = "tiny-team"  # the registered model (and MLflow experiment) of the session's runs
NIGHTLY_OVERRIDES = [[], ["stages.0.sparsity=0.3"]]


def nightly_runs(stack: TeamStack, tiny_model_dir: Path, timeout: float = 900) -> dict:
    """The session's two deployment runs of the nightly flow (tiny_recipe: magnitude 0.5 resp. 0.3,
    rtn, kl; registered as NIGHTLY_MODEL), one tiny project each under the team folder, triggered at
    once through the Prefect API and run by the team's worker, with the one-slot GPU limit between
    them. Triggered on the first call; every later call returns the same {flow_run_id: (project,
    flow_run)} (trigger order), or fails the same way if a run did not complete."""
    import pytest
    from prefect.exceptions import PrefectHTTPStatusError

    if isinstance(stack._runs, str):
        pytest.fail(stack._runs)
    if stack._runs is not None:
        return stack._runs
    scratch = stack.home / "nightly-projects"
    model = shutil.copytree(tiny_model_dir, scratch / "tiny-llama")  # not under pytest's rotating basetemp
    recipe = tiny_recipe(model, NIGHTLY_MODEL, data={"calib_windows": 4, "train_windows": 8, "eval_windows": 4},
                         evaluation={"decode_tokens": 4, "decode_race_rounds": 0}, gates={"min_size_reduction": 1.0})
    projects = []
    for i in range(len(NIGHTLY_OVERRIDES)):
        (scratch / f"project-{i}").mkdir()
        projects.append(make_project(scratch / f"project-{i}", recipe))
    started = time.monotonic()
    with stack.prefect() as client:
        deployment = client.read_deployment_by_name("frugalflow-nightly/nightly")
        ids = [client.create_flow_run_from_deployment(
            deployment.id, parameters={"params": str(p / "params.yaml"), "overrides": o}).id
            for p, o in zip(projects, NIGHTLY_OVERRIDES)]

        def finals():
            try:
                got = [client.read_flow_run(i) for i in ids]
            except PrefectHTTPStatusError:  # a busy server's 5xx: ask again
                return None
            return got if all(r.state and r.state.is_final() for r in got) else None

        done = wait_for(finals, timeout, 1)
    worker_log = tail(stack.logs / "worker.log")
    if not done:
        stack._runs = f"deployment runs not final within {timeout} s; worker log:\n{worker_log}"
    else:
        failed = [f"flow run {r.id} ended {r.state.type}: {r.state.message}" for r in done if not r.state.is_completed()]
        if failed:
            stack._runs = "\n".join(failed) + f"\n{worker_log}"
    if isinstance(stack._runs, str):
        pytest.fail(stack._runs)
    print(f"two deployment runs COMPLETED {time.monotonic() - started:.1f} s after they were triggered")
    stack._runs = {str(r.id): (p, r) for p, r in zip(projects, done)}
    return stack._runs


def start_team(home: Path, project_root: Path | None = None) -> TeamStack:
    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    _reachable_by_others(home)
    ports = {service: free_port() for service in SERVICES}
    project = Path(project_root or ROOT).resolve()
    team = open_team(home, project, ports)
    return TeamStack(home=home, project_root=project, ports=ports, team=team).start()
