"""PostgreSQL for team mode: Debian's server binaries, one cluster under the team folder, TCP on
loopback only (no Unix socket), password auth, one role and one database each for MLflow and Prefect.

Run as root (CI), the server runs as the `postgres` system user, which owns the cluster folder.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
from pathlib import Path

from tasks.team.config import Team, TeamError, TeamInputError
from tasks.team.procs import tail

BINDIR_VAR = "FRUGALFLOW_PG_BINDIR"
INSTALL_HINT = ("install Debian's package (`apt-get install postgresql`; `make team` does it when root) "
                f"or set {BINDIR_VAR} to the folder holding initdb and pg_ctl")


def find_bindir() -> Path:
    """The folder with initdb and pg_ctl: $FRUGALFLOW_PG_BINDIR, else the newest
    /usr/lib/postgresql/<version>/bin, else the PATH."""
    def has_tools(folder: Path) -> bool:
        return all((folder / tool).is_file() and os.access(folder / tool, os.X_OK) for tool in ("initdb", "pg_ctl"))

    given = os.environ.get(BINDIR_VAR)
    if given:
        if not has_tools(Path(given)):
            raise TeamInputError(f"{BINDIR_VAR}={given!r}: no initdb and pg_ctl there; {INSTALL_HINT}")
        return Path(given)
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                      key=lambda p: [int(x) for x in Path(p).parent.name.split(".") if x.isdigit()], reverse=True)
    for folder in map(Path, versions):
        if has_tools(folder):
            return folder
    on_path = shutil.which("initdb")
    if on_path and has_tools(Path(on_path).parent):
        return Path(on_path).parent
    raise TeamInputError(f"PostgreSQL server binaries (initdb, pg_ctl) not found; {INSTALL_HINT}")


def _as_user() -> dict:
    """subprocess arguments that run PostgreSQL as `postgres` when we are root (it refuses root)."""
    if os.geteuid() != 0:
        return {}
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise TeamInputError("running as root, PostgreSQL needs the `postgres` system user, which is missing; "
                             + INSTALL_HINT) from None
    return {"user": "postgres", "group": "postgres"}


def _own(path: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, "postgres", "postgres")


def cluster_dir(team: Team) -> Path:
    return team.home / "pg"


def _pg(team: Team, bindir: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ.get("PATH", ""), "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
    return subprocess.run([str(bindir / args[0]), *args[1:]], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=cluster_dir(team), **_as_user())


def ensure_cluster(team: Team, bindir: Path) -> None:
    """initdb once (admin password from the env file, scram-sha-256 for every connection)."""
    root = cluster_dir(team)
    data = root / "data"
    if (data / "PG_VERSION").is_file():
        return
    root.mkdir(parents=True, exist_ok=True)
    _own(root)
    user = _as_user()
    if user and subprocess.run(["test", "-w", str(root)], **user).returncode != 0:
        raise TeamInputError(f"the postgres user cannot write {root}: every folder above it must be searchable "
                             "by others (chmod o+x), or choose another --home")
    pwfile = root / "admin-password"
    fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(team.pg["admin_password"] + "\n")
    _own(pwfile)
    try:
        done = _pg(team, bindir, "initdb", "-D", str(data), "-U", team.pg["admin_user"], f"--pwfile={pwfile}",
                   "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C.UTF-8")
    finally:
        pwfile.unlink(missing_ok=True)
    if done.returncode != 0:
        raise TeamError(f"initdb of {data} failed ({done.returncode}):\n{done.stderr[-2000:]}")


def pid(team: Team) -> int | None:
    pidfile = cluster_dir(team) / "data" / "postmaster.pid"
    try:
        return int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def start(team: Team, bindir: Path, timeout: float = 60) -> int:
    log = team.logs() / "postgres.log"
    log.touch()
    _own(log)
    opts = (f"-p {team.port('postgres')} -c listen_addresses={team.host} -c unix_socket_directories='' "
            "-c max_connections=200")
    done = _pg(team, bindir, "pg_ctl", "-D", str(cluster_dir(team) / "data"), "-l", str(log), "-o", opts,
               "-w", "-t", str(int(timeout)), "start", timeout=timeout + 30)
    if done.returncode != 0:
        raise TeamError(f"postgres on {team.host}:{team.port('postgres')} did not start ({done.stderr.strip()}); "
                        f"its log {log} ends:\n{tail(log)}")
    return pid(team)


def stop(team: Team, bindir: Path) -> None:
    if (cluster_dir(team) / "data" / "postmaster.pid").is_file():
        _pg(team, bindir, "pg_ctl", "-D", str(cluster_dir(team) / "data"), "-m", "fast", "-w", "-t", "60", "stop",
            timeout=90)


def connect(team: Team, dbname: str = "postgres", user: str | None = None, password: str | None = None):
    import psycopg2

    pg = team.pg
    return psycopg2.connect(host=pg["host"], port=pg["port"], dbname=dbname, user=user or pg["admin_user"],
                            password=password or pg["admin_password"], connect_timeout=5)


def healthy(team: Team) -> bool:
    try:
        with connect(team) as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")
            return cur.fetchone() == (1,)
    except Exception:
        return False


def ensure_databases(team: Team) -> None:
    """A login role and an owned database per service; passwords kept equal to the env file's."""
    from psycopg2 import sql

    conn = connect(team)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for db in team.spec["postgres"]["databases"]:
                password = team.pg[db]["password"]
                cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (db,))
                verb = "ALTER" if cur.fetchone() else "CREATE"
                cur.execute(sql.SQL(verb + " ROLE {} LOGIN PASSWORD %s").format(sql.Identifier(db)), (password,))
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
                if not cur.fetchone():
                    cur.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(db), sql.Identifier(db)))
    finally:
        conn.close()
