"""Recovery from any host: two simulated hosts (two folders, two host names via FRUGALFLOW_HOST_NAME)
share the team's MLflow server. A run whose process on host `alpha` is SIGKILLed is closed FAILED by
`close_orphans` on host `beta` once its heartbeat is older than the lease, not before, while a run
on `alpha` that still beats stays RUNNING (tasks/runstate.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import ROOT, wait_for

pytestmark = pytest.mark.slow
OPEN_RUN = """
import sys, time
from mlflow import MlflowClient
from tasks import tracking as T
from tasks.runstate import process_tags
client = MlflowClient(sys.argv[1])
print(T.start_run(client, sys.argv[2], "on-alpha", tags=process_tags()), flush=True)
time.sleep(600)
"""


def test_a_run_killed_on_one_host_is_closed_by_another_once_its_lease_runs_out(team_stack, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from tasks import runstate

    client = MlflowClient(team_stack.mlflow_uri)
    experiment = client.create_experiment(f"hosts-{os.getpid()}")
    env = {**team_stack.env(), "PYTHONPATH": str(ROOT), "FRUGALFLOW_HOST_NAME": "alpha", "FRUGALFLOW_HEARTBEAT_S": "0.5"}
    alpha, logs = [], []
    for name in ("killed", "alive"):
        folder = tmp_path / f"alpha-{name}"
        folder.mkdir()
        logs.append(folder / "stderr.log")
        with open(logs[-1], "w") as err:
            alpha.append(subprocess.Popen([sys.executable, "-c", OPEN_RUN, team_stack.mlflow_uri, experiment],
                                          cwd=folder, env=env, stdout=subprocess.PIPE, stderr=err, text=True))
    try:
        killed, alive = (p.stdout.readline().strip() for p in alpha)
        assert killed and alive, "\n".join(log.read_text()[-2000:] for log in logs)
        first = {r: client.get_run(r).data.tags[runstate.HEARTBEAT_TAG] for r in (killed, alive)}
        assert wait_for(lambda: all(client.get_run(r).data.tags[runstate.HEARTBEAT_TAG] != first[r]
                                    for r in (killed, alive)), 60, 0.5), "\n".join(log.read_text()[-2000:] for log in logs)
        os.kill(alpha[0].pid, signal.SIGKILL)
        alpha[0].wait()
        (tmp_path / "beta").mkdir()
        monkeypatch.chdir(tmp_path / "beta")
        monkeypatch.setenv("FRUGALFLOW_HOST_NAME", "beta")
        monkeypatch.setattr(runstate, "LEASE_S", 10.0)
        assert runstate.close_orphans(client, [experiment]) == []  # its last beat is within the lease
        assert client.get_run(killed).info.status == "RUNNING"
        time.sleep(10.5)
        assert runstate.close_orphans(client, [experiment]) == [killed]
        run = client.get_run(killed)
        assert run.info.status == "FAILED"
        assert run.data.tags["frugalflow.failure"].startswith("lost: its process alpha:")
        assert "closed by beta:" in run.data.tags["frugalflow.failure"]
        assert client.get_run(alive).info.status == "RUNNING"  # still beating on alpha
    finally:
        for proc in alpha:
            proc.kill()
            proc.wait()
