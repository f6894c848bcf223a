"""`frugalflow team up | status | down` around the real services: refusals before anything starts
(a taken port: exit 4; no PostgreSQL binaries: exit 2), the env file of generated secrets (0600,
reused, never in a command line), what clients get, and `status` of the running stack (the
`team_stack` fixture). Down/up without loss is in tests/test_team_e2e.py."""
from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile
from pathlib import Path

import psutil
import pytest
from helpers import ROOT, free_port

from flows.cli import main
from tasks.team.config import SERVICES, open_team, read_env


@pytest.fixture
def home():
    path = Path(tempfile.mkdtemp(prefix="frugalflow-team-t-"))
    yield path / "team"
    shutil.rmtree(path, ignore_errors=True)


def no_process_mentions(text: str) -> bool:
    for proc in psutil.process_iter(["cmdline"]):
        if proc.pid != os.getpid() and text in " ".join(proc.info["cmdline"] or []):
            return False
    return True


def test_env_file_secrets_are_private_reused_and_kept_from_clients(home):
    team = open_team(home, ROOT, {s: free_port() for s in SERVICES})
    assert stat.S_IMODE(team.env_file.stat().st_mode) == 0o600
    again = open_team(home, ROOT)
    assert again.env == team.env  # reused, ports included
    secrets = team.secrets
    assert set(secrets) == {"POSTGRES_PASSWORD", "MLFLOW_DB_PASSWORD", "PREFECT_DB_PASSWORD", "MINIO_ROOT_PASSWORD",
                            "MLFLOW_S3_SECRET_KEY", "FRUGALFLOW_S3_SECRET_KEY", "MLFLOW_ADMIN_PASSWORD",
                            "MLFLOW_FLASK_SECRET_KEY", "MLFLOW_MEMBER_PASSWORD", "MLFLOW_READER_PASSWORD",
                            "PREFECT_AUTH_PASSWORD"}
    assert len(set(secrets.values())) == len(secrets) and all(len(v) >= 24 for v in secrets.values())
    client = team.client_env()
    assert client["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{team.port('mlflow')}"
    assert client["PREFECT_API_URL"] == f"http://127.0.0.1:{team.port('prefect')}/api"
    assert client["AWS_SECRET_ACCESS_KEY"] == secrets["FRUGALFLOW_S3_SECRET_KEY"]
    assert (client["MLFLOW_TRACKING_USERNAME"], client["MLFLOW_TRACKING_PASSWORD"]) == team.mlflow_accounts["member"]
    assert client["PREFECT_API_AUTH_STRING"] == f"frugalflow:{secrets['PREFECT_AUTH_PASSWORD']}"
    member = {"FRUGALFLOW_S3_SECRET_KEY", "MLFLOW_MEMBER_PASSWORD", "PREFECT_AUTH_PASSWORD"}
    assert [k for k, v in secrets.items() if k not in member and v in str(client)] == []
    # a read-only member gets the MLflow reader login and nothing else secret
    reader = team.reader_env()
    assert set(reader) == {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
    assert (reader["MLFLOW_TRACKING_USERNAME"], reader["MLFLOW_TRACKING_PASSWORD"]) == team.mlflow_accounts["reader"]
    assert [k for k, v in secrets.items() if k != "MLFLOW_READER_PASSWORD" and v in str(reader)] == []
    # a later --port is stored; an unknown service is refused
    moved = open_team(home, ROOT, {"mlflow": 5999})
    assert read_env(team.env_file)["TEAM_MLFLOW_PORT"] == "5999" and moved.secrets == secrets


def test_up_refuses_a_taken_port_before_starting_anything(home, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = [f"--port={s}={free_port()}" for s in SERVICES if s != "prefect"]
        code = main(["team", "up", "--home", str(home), "--project", str(ROOT), *ports, f"--port=prefect={port}"])
    err = capsys.readouterr().err
    assert code == 4, err
    assert f"Prefect server: port 127.0.0.1:{port} is already taken" in err and "--port prefect=PORT" in err
    assert not (home / "pg").exists() and not (home / "state.json").exists()  # nothing started
    assert no_process_mentions(str(home))


def test_up_without_postgresql_binaries_is_bad_input(home, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("FRUGALFLOW_PG_BINDIR", str(tmp_path))
    assert main(["team", "up", "--home", str(home), "--project", str(ROOT)]) == 2
    err = capsys.readouterr().err
    assert "FRUGALFLOW_PG_BINDIR" in err and "apt-get install postgresql" in err
    assert not (home / "pg").exists()


def test_up_outside_a_checkout_and_status_without_an_installation(home, capsys, tmp_path):
    assert main(["team", "up", "--home", str(home), "--project", str(tmp_path)]) == 2
    assert "not a frugalflow checkout" in capsys.readouterr().err
    assert main(["team", "status", "--home", str(home)]) == 2
    assert "frugalflow team up" in capsys.readouterr().err


def test_status_of_an_installation_that_is_down(home, capsys):
    open_team(home, ROOT, {s: free_port() for s in SERVICES})
    assert main(["team", "status", "--home", str(home)]) == 4
    out = capsys.readouterr().out
    for name in ("PostgreSQL", "S3 (moto)", "MLflow server", "Prefect server", "Prefect worker"):
        assert name in out
    assert out.count(" down ") == 5


@pytest.mark.slow
def test_status_names_every_service_and_servers_hold_only_their_secrets(team_stack, capsys):
    assert main(["team", "status", "--home", str(team_stack.home)]) == 0
    out = capsys.readouterr().out
    rows = team_stack.status()
    assert list(rows) == ["postgres", "s3", "mlflow", "prefect", "worker"]
    for row in rows.values():
        assert row["health"] == "healthy" and row["pid"] and psutil.pid_exists(row["pid"])
        assert f"pid {row['pid']}" in out and row["address"] in out
    assert rows["mlflow"]["address"] == team_stack.mlflow_uri
    assert {p.name for p in team_stack.logs.iterdir()} >= {"postgres.log", "s3.log", "mlflow.log",
                                                           "prefect-server.log", "worker.log"}
    # no secret on any command line; the MLflow bucket key only in the MLflow server's environment
    for secret in team_stack.secrets.values():
        assert no_process_mentions(secret)
    mlflow_key = team_stack.team.s3_key("mlflow")[1]
    assert psutil.Process(rows["mlflow"]["pid"]).environ()["AWS_SECRET_ACCESS_KEY"] == mlflow_key
    admin_password = team_stack.team.mlflow_accounts["admin"][1]
    assert psutil.Process(rows["mlflow"]["pid"]).environ()["MLFLOW_AUTH_ADMIN_PASSWORD"] == admin_password
    worker_env = psutil.Process(rows["worker"]["pid"]).environ()
    for server_only in (mlflow_key, team_stack.pg["mlflow"]["password"], admin_password):
        assert server_only not in worker_env.values()
    assert worker_env["AWS_SECRET_ACCESS_KEY"] == team_stack.client_env["AWS_SECRET_ACCESS_KEY"]
    # every bucket exists; the service roles log in to their own databases
    from tasks.team import s3

    names = {b["Name"] for b in s3.client(team_stack.team).list_buckets()["Buckets"]}  # the root key sees them all
    assert names >= set(team_stack.buckets.values())
    for db in ("mlflow", "prefect"):
        with team_stack.sql(db) as conn, conn.cursor() as cur:
            cur.execute("SELECT current_user, current_database()")
            assert cur.fetchone() == (db, db)
    client_env = read_env(team_stack.team.client_env_file)
    assert client_env == team_stack.client_env
    assert read_env(team_stack.team.reader_env_file) == team_stack.team.reader_env()
    for path in (team_stack.team.client_env_file, team_stack.team.reader_env_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_down_signals_only_the_processes_it_started(home):
    """state.json names each service's pid and its start time: a pid now held by another process (reused
    after a reboot) is left alone, while the recorded process itself is stopped."""
    import json
    import subprocess

    from tasks.team import stack

    open_team(home, ROOT, {s: free_port() for s in SERVICES})
    other = subprocess.Popen(["sleep", "120"])
    try:
        started = psutil.Process(other.pid).create_time()
        state = home / "state.json"
        state.write_text(json.dumps({"services": {"worker": {"pid": other.pid, "created": started - 3600}}}))
        rows = {r["service"]: r for r in stack.down(home, ROOT, log=lambda line: None)}
        assert other.poll() is None and rows["worker"]["health"] == "down"  # not ours: untouched
        state.write_text(json.dumps({"services": {"worker": {"pid": other.pid, "created": started}}}))
        stack.down(home, ROOT, log=lambda line: None)
        assert other.wait(timeout=30) is not None  # ours: stopped
    finally:
        other.kill()
        other.wait()
