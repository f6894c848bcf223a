"""`team up`, `team status`, `team down`: the whole local team stack, in dependency order.

`up` is idempotent (running healthy services are kept), checks what it can before starting anything
(PostgreSQL binaries: exit 2; a port taken by something else: exit 4) and, when a step fails, stops
what it started. `down` stops every process tree and checks with psutil that none is left (the S3
server has written every object to disk as it came). Pids, their start times and addresses are kept in
`<team folder>/state.json` (no secrets); a recorded pid whose process started at another time (the pid
reused after a reboot) is never signalled.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from tasks.team import postgres, procs, s3, servers
from tasks.team.config import SERVICES, Team, TeamError, TeamInputError, open_team

ORDER = ("postgres", "s3", "mlflow", "prefect", "worker")
NAMES = {"postgres": "PostgreSQL", "s3": "S3 (moto)", "mlflow": "MLflow server", "prefect": "Prefect server",
         "worker": "Prefect worker"}
START_S = {"postgres": 60, "s3": 60, "mlflow": 240, "prefect": 240, "worker": 120}


def check_project(project_dir: Path | None) -> Path:
    project = Path(project_dir or Path.cwd()).resolve()
    needed = [project / "infra" / "prefect.yaml", project / "flows" / "nightly.py"]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise TeamInputError(f"--project {project}: not a frugalflow checkout ({', '.join(missing)} missing); "
                             "run from the repository root or pass --project")
    return project


def state_file(team: Team) -> Path:
    return team.home / "state.json"


def read_state(team: Team) -> dict:
    try:
        return json.loads(state_file(team).read_text())
    except (OSError, ValueError):
        return {"services": {}}


def write_state(team: Team, state: dict) -> None:
    tmp = state_file(team).with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(state_file(team))


def address(team: Team, service: str) -> str:
    if service == "postgres":
        return f"{team.host}:{team.port('postgres')}"
    if service == "worker":
        return f"pool {team.work_pool} @ {team.prefect_api}"
    return {"s3": team.s3_endpoint, "mlflow": team.mlflow_uri, "prefect": team.url("prefect")}[service]


def service_pid(team: Team, state: dict, service: str) -> int | None:
    """The service's pid, or None when the recorded one is gone or now belongs to another process."""
    if service == "postgres":
        return postgres.pid(team)  # postmaster.pid: PostgreSQL checks it itself
    entry = state["services"].get(service, {})
    pid = entry.get("pid")
    return pid if pid and procs.same_process(pid, entry.get("created")) else None


def healthy(team: Team, service: str, since: float = 0.0) -> bool:
    try:
        if service == "postgres":
            return postgres.healthy(team)
        if service == "s3":
            return s3.healthy(team)
        if service == "mlflow":
            return servers.mlflow_healthy(team)
        if service == "prefect":
            return servers.prefect_healthy(team)
        return servers.worker_online(team, since)
    except Exception:
        return False


def _record(team: Team, state: dict, service: str, pid: int) -> None:
    state["services"][service] = {"pid": pid, "created": procs.created(pid), "address": address(team, service),
                                  "started": time.time()}
    write_state(team, state)


def up(home: Path | None = None, project_dir: Path | None = None, ports: dict[str, int] | None = None,
       log=print) -> list[dict]:
    """Bring every service up (those already healthy are kept); the status rows at the end."""
    project = check_project(project_dir)
    team = open_team(home, project, ports)
    bindir = postgres.find_bindir()  # exit 2 before anything starts
    state = read_state(team)
    running = {s for s in ORDER[:-1] if procs.alive(service_pid(team, state, s)) and healthy(team, s)}
    for service in SERVICES:
        if service not in running and not procs.port_free(team.host, team.port(service)):
            raise TeamError(f"{NAMES[service]}: port {team.host}:{team.port(service)} is already taken by another "
                            f"process; free it or choose another port: frugalflow team up --port {service}=PORT")
    started: list[str] = []
    t0 = time.monotonic()
    try:
        if "postgres" not in running:
            postgres.ensure_cluster(team, bindir)
            _record(team, state, "postgres", postgres.start(team, bindir, START_S["postgres"]))
            started.append("postgres")
        postgres.ensure_databases(team)
        log(f"  postgres   {address(team, 'postgres')}  ({time.monotonic() - t0:.1f} s)")
        if "s3" not in running:
            _record(team, state, "s3", s3.start(team, START_S["s3"]))
            started.append("s3")
        s3.ensure_buckets(team)
        log(f"  s3         {team.s3_endpoint}  buckets {', '.join(team.buckets.values())}; "
            f"{s3.count_objects(team)} objects kept in {s3.data_dir(team)}  ({time.monotonic() - t0:.1f} s)")
        for service, starter in (("mlflow", servers.start_mlflow), ("prefect", servers.start_prefect)):
            if service not in running:
                _record(team, state, service, starter(team))
                started.append(service)
        def wait(service: str) -> None:
            pid = service_pid(team, state, service)
            procs.wait_until(lambda: healthy(team, service), pid, NAMES[service], address(team, service),
                             team.logs() / f"{'prefect-server' if service == 'prefect' else service}.log",
                             START_S[service])
            log(f"  {service:<10} {address(team, service)}  ({time.monotonic() - t0:.1f} s)")

        wait("prefect")  # the pool, the worker and the deployment go ahead while MLflow migrates its database
        servers.ensure_pool_and_limit(team)
        worker_pid = service_pid(team, state, "worker")
        since = time.time()
        if not procs.alive(worker_pid):
            worker_pid = servers.start_worker(team)
            _record(team, state, "worker", worker_pid)
            started.append("worker")
        fingerprint = servers.deployment_fingerprint(team)
        if state.get("deployed") != fingerprint or not servers.deployment_exists(team):
            servers.deploy(team)
            state["deployed"] = fingerprint
            write_state(team, state)
        log(f"  deployment {team.spec['prefect']['deployment']['flow']}/{team.spec['prefect']['deployment']['name']} "
            f"from {team.spec['prefect']['deployment']['file']}  ({time.monotonic() - t0:.1f} s)")
        wait("mlflow")
        servers.ensure_mlflow_accounts(team)
        procs.wait_until(lambda: healthy(team, "worker", since if "worker" in started else 0.0), worker_pid,
                         NAMES["worker"], address(team, "worker"), team.logs() / "worker.log", START_S["worker"])
        log(f"  worker     {address(team, 'worker')}  ({time.monotonic() - t0:.1f} s)")
    except BaseException:
        _stop(team, read_state(team), bindir, [s for s in ORDER if s in started])
        raise
    from tasks.team.config import write_env

    write_env(team.client_env_file, team.client_env(),
              f"# frugalflow team mode: `set -a; . {team.client_env_file}; set +a` points a shell at the team\n")
    write_env(team.reader_env_file, team.reader_env(),
              f"# frugalflow team mode, read-only: `set -a; . {team.reader_env_file}; set +a` browses MLflow\n")
    return status(team.home, project)


def status(home: Path | None = None, project_dir: Path | None = None) -> list[dict]:
    """One row per service: name, address, pid, health (healthy / unhealthy / down)."""
    team = open_team(home, Path(project_dir or Path.cwd()), create=False)
    state = read_state(team)
    rows = []
    for service in ORDER:
        pid = service_pid(team, state, service)
        running = procs.alive(pid)
        ok = running and healthy(team, service, time.time() - 60)
        rows.append({"service": service, "name": NAMES[service], "address": address(team, service),
                     "pid": pid if running else None, "health": "healthy" if ok else ("unhealthy" if running else "down")})
    return rows


def _stop(team: Team, state: dict, bindir: Path | None, services: list[str]) -> list[int]:
    pids: list[int] = []
    for service in reversed(services):
        pid = service_pid(team, state, service)
        if service == "postgres" and bindir is not None:
            postgres.stop(team, bindir)
        pids += procs.stop_tree(pid) if procs.alive(pid) else []
        if pid:
            pids.append(pid)
        state["services"].pop(service, None)
        write_state(team, state)
    return pids


def down(home: Path | None = None, project_dir: Path | None = None, log=print) -> list[dict]:
    """Stop every service (S3's objects are on disk already), check that no process is left; the status rows."""
    team = open_team(home, Path(project_dir or Path.cwd()), create=False)
    state = read_state(team)
    try:
        bindir = postgres.find_bindir()
    except TeamInputError:
        bindir = None  # stop its process tree by pid instead
    pids = _stop(team, state, bindir, list(ORDER))
    left = procs.survivors(pids)
    if left:
        raise TeamError(f"team down: processes still running after SIGKILL: {', '.join(left)}")
    log(f"  stopped {len(set(pids))} processes")
    return status(team.home, team.project_dir)
