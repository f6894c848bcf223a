"""The sweep on a real Dask cluster on loopback (`dask scheduler` and two `dask worker` processes,
each started in its own empty folder) through Prefect's DaskTaskRunner: candidates run on both
workers, a shared stage is computed once, and the result matches the local process-pool sweep's
selection rules. Bad and unreachable cluster addresses exit 2 and 4."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import client_for, make_project, tiny_recipe

from flows.cli import main as cli

MODEL = "tiny-dask-sweep"
GRID = ["stages.0.sparsity=0.2,0.6", "stages.1.bits=4,8"]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir):
    recipe = tiny_recipe(tiny_model_dir, MODEL, gates={"max_ppl_increase_pct": 1000.0, "min_size_reduction": 4.0})
    return make_project(tmp_path_factory.mktemp("dask-sweep"), recipe)


@contextlib.contextmanager
def dask_cluster(tmp_path_factory, procs: list):
    """A scheduler and two workers on loopback; `procs` gets [scheduler, worker0, worker1]."""
    from prefect.settings import PREFECT_API_URL

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "OMP_NUM_THREADS": "1"}
    try:
        home = tmp_path_factory.mktemp("scheduler")
        procs.append(subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                       "--no-dashboard"], cwd=home, env=env, start_new_session=True,
                                      stdout=subprocess.DEVNULL, stderr=open(home / "log", "w")))
        for i in range(2):
            home = tmp_path_factory.mktemp(f"worker{i}")
            procs.append(subprocess.Popen([str(BIN / "dask"), "worker", address, "--nthreads", "1", "--nworkers", "1",
                                           "--no-nanny", "--no-dashboard", "--name", f"w{i}",
                                           "--local-directory", str(home)],
                                          cwd=home, env=env, start_new_session=True,
                                          stdout=subprocess.DEVNULL, stderr=open(home / "log", "w")))
        from distributed import Client

        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        yield address
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def cluster(prefect_harness, tmp_path_factory):
    with dask_cluster(tmp_path_factory, []) as address:
        yield address


@pytest.fixture(scope="module")
def sweep(cluster, project):
    from flows.sweep import cluster_runner, sweep_flow

    return sweep_flow.with_options(task_runner=cluster_runner(cluster))(
        params=str(project / "params.yaml"), grid=GRID)


def test_candidates_run_on_both_dask_workers_at_once(sweep, project):
    client = client_for(project)
    experiment = client.get_experiment_by_name(MODEL).experiment_id
    candidates = client.search_runs([experiment], f"tags.`frugalflow.sweep_run` = '{sweep['run_id']}'")
    assert sorted(r.info.run_name for r in candidates) == sorted(
        ["sparsity=0.2,bits=4", "sparsity=0.2,bits=8", "sparsity=0.6,bits=4", "sparsity=0.6,bits=8"])
    assert all(r.info.status == "FINISHED" and "ppl" in r.data.metrics for r in candidates)
    ids = {r.info.run_id for r in candidates}
    stage_runs = [r for r in client.search_runs([experiment], "tags.`frugalflow.stage` != ''")
                  if r.data.tags.get("mlflow.parentRunId") in ids]
    workers = {r.data.tags["frugalflow.worker"] for r in stage_runs}
    assert f"{socket.gethostname()}:{os.getpid()}" not in workers  # not in the flow's process
    assert len(workers) == 2  # the two dask workers
    # the two workers computed at the same time: their stage runs' time windows overlap
    windows = {w: (min(r.info.start_time for r in stage_runs if r.data.tags["frugalflow.worker"] == w),
                   max(r.info.end_time for r in stage_runs if r.data.tags["frugalflow.worker"] == w))
               for w in workers}
    (a0, a1), (b0, b1) = windows.values()
    assert a0 < b1 and b0 < a1
    # each prune stage is shared by two candidates: computed once, the other takes it from the cache
    prune = [r for r in stage_runs if r.data.tags["frugalflow.stage"] == "prune"]
    assert sorted(r.data.tags["frugalflow.cached"] for r in prune) == ["False", "False", "True", "True"]
    assert sweep["selected"] is not None
    selected = [c for c in sweep["candidates"] if c["selected"]]
    assert len(selected) == 1 and selected[0]["pareto"] and selected[0]["passed"]


def test_bad_and_unreachable_cluster_addresses(project):
    from flows.sweep import cluster_runner
    from frugalflow.errors import BadInput, ServiceUnavailable

    for bad in ("127.0.0.1:8786", "tcp://127.0.0.1", "http://127.0.0.1:8786", "tcp://127.0.0.1:99999"):
        with pytest.raises(BadInput, match="tcp://HOST:PORT"):
            cluster_runner(bad)
    with pytest.raises(ServiceUnavailable, match="Dask scheduler"):
        cluster_runner(f"tcp://127.0.0.1:{free_port()}")

    # through the CLI: exit 2 and 4 before the flow starts
    params = str(project / "params.yaml")
    assert cli(["sweep", "-p", params, "-g", GRID[0], "--cluster", "127.0.0.1:8786"]) == 2
    assert cli(["sweep", "-p", params, "-g", GRID[0], "--cluster", f"tcp://127.0.0.1:{free_port()}"]) == 4
    # the recipe key: refused by the recipe loader, or a scheduler that does not answer
    with pytest.raises(SystemExit) as refused:
        cli(["sweep", "-p", params, "-g", GRID[0], "-s", "sweep.cluster=127.0.0.1:8786"])
    assert refused.value.code == 2
    assert cli(["sweep", "-p", params, "-g", GRID[0], "-s", f"sweep.cluster=tcp://127.0.0.1:{free_port()}"]) == 4


def test_a_killed_worker_s_candidates_are_retried_on_the_other(prefect_harness, tmp_path_factory, tiny_model_dir):
    from distributed import Client

    from flows.sweep import cluster_runner, sweep_flow

    recipe = tiny_recipe(tiny_model_dir, MODEL + "-kill", gates={"max_ppl_increase_pct": 1000.0,
                                                               "min_size_reduction": 4.0})
    project = make_project(tmp_path_factory.mktemp("dask-kill"), recipe)
    procs: list = []
    killed = threading.Event()
    with dask_cluster(tmp_path_factory, procs) as address:
        victim = procs[1]

        def kill_when_busy():  # SIGKILL worker 0 once it has been computing a stage for a moment
            with Client(address, timeout=30) as client:
                deadline = time.monotonic() + 600
                while time.monotonic() < deadline and not killed.is_set():
                    busy = [w for w, tasks in client.processing().items() if tasks]
                    mine = [w for w, info in client.scheduler_info()["workers"].items() if info.get("name") == "w0"]
                    if mine and mine[0] in busy:
                        time.sleep(3)
                        os.killpg(victim.pid, signal.SIGKILL)
                        killed.set()
                        return
                    time.sleep(0.5)

        killer = threading.Thread(target=kill_when_busy, daemon=True)
        killer.start()
        result = sweep_flow.with_options(task_runner=cluster_runner(address))(
            params=str(project / "params.yaml"), grid=GRID)
        killer.join(timeout=5)
    assert killed.is_set() and victim.poll() is not None  # worker 0 died mid-sweep
    assert [c["error"] for c in result["candidates"]] == [None] * 4  # every candidate still completed
    assert all(c["metrics"] and "ppl" in c["metrics"] for c in result["candidates"])
    assert result["selected"] is not None
