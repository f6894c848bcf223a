"""The sweep on a real Dask cluster on loopback (`dask scheduler` and two `dask worker` processes,
each started in its own empty folder) through Prefect's DaskTaskRunner, the workers sharing nothing
with the flow but the team stack's S3 API (the stage store) and MLflow server: candidates run on
both workers, a shared stage is computed once, and the metrics and the selected candidate are the
local process-pool sweep's. A worker killed mid-sweep: its candidates finish on the other. Bad and
unreachable cluster addresses exit 2 and 4."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest
from helpers import dask_cluster, free_port, make_project, tiny_recipe

from flows.cli import main as cli

MODEL = "tiny-dask-sweep"
GRID = ["stages.0.sparsity=0.2,0.6", "stages.1.bits=4,8"]


GATES = {"max_ppl_increase_pct": 1000.0, "min_size_reduction": 4.0}
COMPARED = ("ppl", "size_mb", "sparsity", "bits_per_weight")  # decode speed is a timing, not compared


def team_project(tmp_path_factory, tiny_model_dir, team_stack, name: str) -> Path:
    """A tiny project whose runs are tracked on the team's MLflow server."""
    recipe = tiny_recipe(tiny_model_dir, name, gates=GATES, tracking={"uri": team_stack.mlflow_uri})
    return make_project(tmp_path_factory.mktemp(name), recipe)


@contextlib.contextmanager
def flow_env(team_stack):
    """The flow's process: the team's S3 API, and a stage store of its own (empty) under the models bucket."""
    store = f"s3://{team_stack.buckets['models']}/stages-dask-{uuid.uuid4().hex[:8]}"
    keys = ("AWS_ENDPOINT_URL", "FRUGALFLOW_S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    with pytest.MonkeyPatch.context() as mp:
        for key in keys:
            mp.setenv(key, team_stack.client_env[key])
        mp.setenv("FRUGALFLOW_STAGE_STORE", store)
        yield store


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir, team_stack):
    return team_project(tmp_path_factory, tiny_model_dir, team_stack, MODEL)


def team_cluster(tmp_path_factory, procs: list, team_stack, homes: list | None = None):
    """dask_cluster with the team's client environment, each process in a new empty folder (the
    workers' appended to `homes`)."""
    from prefect.settings import PREFECT_API_URL

    workers = [tmp_path_factory.mktemp(f"worker{i}") for i in range(2)]
    if homes is not None:
        homes.extend(workers)
    env = team_stack.env(PREFECT_API_URL=PREFECT_API_URL.value(), OMP_NUM_THREADS="1")
    return dask_cluster(tmp_path_factory.mktemp("scheduler"), workers, env, procs)


@pytest.fixture(scope="module")
def homes():
    return []


@pytest.fixture(scope="module")
def cluster(prefect_harness, tmp_path_factory, team_stack, homes):
    with team_cluster(tmp_path_factory, [], team_stack, homes) as address:
        yield address


@pytest.fixture(scope="module")
def sweep(cluster, project, team_stack):
    from flows.sweep import cluster_runner, sweep_flow

    with flow_env(team_stack) as store:
        result = sweep_flow.with_options(task_runner=cluster_runner(cluster))(
            params=str(project / "params.yaml"), grid=GRID)
    return {**result, "store": store}


@pytest.fixture(scope="module")
def local_sweep(prefect_harness, tmp_path_factory, tiny_model_dir):
    """The same sweep in local worker processes, on its own project with a local tracking store."""
    from flows.sweep import sweep_flow

    project = make_project(tmp_path_factory.mktemp("local-sweep"), tiny_recipe(tiny_model_dir, MODEL, gates=GATES))
    return sweep_flow(params=str(project / "params.yaml"), grid=GRID)


def test_candidates_run_on_both_dask_workers_at_once(sweep, team_stack):
    from mlflow import MlflowClient

    client = MlflowClient(team_stack.mlflow_uri)  # the workers tracked there: they share no store file
    experiment = client.get_experiment_by_name(MODEL).experiment_id
    candidates = client.search_runs([experiment], f"tags.`frugalflow.sweep_run` = '{sweep['run_id']}'")
    assert sorted(r.info.run_name for r in candidates) == sorted(
        ["sparsity=0.2,bits=4", "sparsity=0.2,bits=8", "sparsity=0.6,bits=4", "sparsity=0.6,bits=8"])
    assert all(r.info.status == "FINISHED" and "ppl" in r.data.metrics for r in candidates)
    ids = {r.info.run_id for r in candidates}
    stage_runs = [r for r in client.search_runs([experiment], "tags.`frugalflow.stage` != ''")
                  if r.data.tags.get("mlflow.parentRunId") in ids]
    assert len(stage_runs) == 12  # 4 candidates x 3 stages
    workers = {r.data.tags["frugalflow.worker"] for r in stage_runs}
    assert f"{socket.gethostname()}:{os.getpid()}" not in workers  # not in the flow's process
    assert len(workers) == 2  # the two dask workers
    # the two workers computed at the same time: their stage runs' time windows overlap
    windows = {w: (min(r.info.start_time for r in stage_runs if r.data.tags["frugalflow.worker"] == w),
                   max(r.info.end_time for r in stage_runs if r.data.tags["frugalflow.worker"] == w))
               for w in workers}
    (a0, a1), (b0, b1) = windows.values()
    assert a0 < b1 and b0 < a1
    # each prune stage is shared by two candidates: computed once on one worker (and uploaded to the
    # stage store), the other candidate takes it from its worker's folder or from the store
    prune = [r for r in stage_runs if r.data.tags["frugalflow.stage"] == "prune"]
    assert sorted(r.data.tags["frugalflow.cached"] for r in prune) == ["False", "False", "True", "True"]
    assert all(r.data.tags["frugalflow.stage_store"] == "uploaded" for r in prune
               if r.data.tags["frugalflow.cached"] == "False")
    assert sweep["selected"] is not None
    selected = [c for c in sweep["candidates"] if c["selected"]]
    assert len(selected) == 1 and selected[0]["pareto"] and selected[0]["passed"]


def test_workers_share_nothing_but_the_stores(sweep, project, homes, team_stack):
    """Each worker read the base model and the data from the stage store into its own folder and
    computed there; the flow's project holds only the candidates' final stages, fetched back."""
    from tasks.storage import parse_s3_uri

    for home in homes:
        work = home / "frugalflow-work"
        inputs = sorted(p.name for p in (work / "inputs").iterdir() if p.is_dir())
        assert [n.split("-")[0] for n in inputs] == ["data", "model"], inputs
        assert (work / "inputs" / inputs[1] / "payload" / "config.json").is_file()
        assert any((work / "artifacts" / "stages").glob("0-magnitude-*"))  # computed or fetched here
    flow_stages = sorted(p.name.split("-")[1] for p in (project / "artifacts" / "stages").iterdir() if p.is_dir())
    assert flow_stages == ["kl"] * 4  # final stages only: nothing upstream came to the flow's folder
    bucket, prefix = parse_s3_uri(sweep["store"])
    s3 = team_stack.s3("worker")
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
            for o in page.get("Contents", [])]
    rel = [k.removeprefix(prefix + "/") for k in keys]
    assert sorted(r.split("/")[1] for r in rel if r.startswith("inputs/") and r.endswith("/manifest.json")
                  and r.count("/") == 2) == inputs  # published by the flow, fetched by each worker
    stage_entries = [r.split("/")[0] for r in rel if r.count("/") == 1 and r.endswith("/manifest.json")]
    assert len(stage_entries) == 2 + 4 + 4, stage_entries  # 2 prune, 4 quantize, 4 distil stages
    from mlflow import MlflowClient

    client = MlflowClient(team_stack.mlflow_uri)
    experiment = client.get_experiment_by_name(MODEL).experiment_id
    uploads = [r.data.tags.get("frugalflow.stage_store") for r in client.search_runs(
        [experiment], "tags.`frugalflow.stage` != ''") if r.data.tags.get("frugalflow.output_dir", "").startswith(
        tuple(str(h) for h in homes))]
    assert uploads.count("uploaded") == len(stage_entries)  # each entry uploaded once, by the worker that computed it


def test_same_metrics_and_selection_as_the_local_sweep(sweep, local_sweep):
    remote = {c["label"]: c for c in sweep["candidates"]}
    local = {c["label"]: c for c in local_sweep["candidates"]}
    assert sorted(remote) == sorted(local)
    for name in local:
        for key in COMPARED:
            assert remote[name]["metrics"][key] == pytest.approx(local[name]["metrics"][key], rel=1e-4), (name, key)
        assert remote[name]["passed"] == local[name]["passed"], name
    assert sweep["selected"] == local_sweep["selected"] is not None


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


def test_a_killed_worker_s_candidates_are_retried_on_the_other(prefect_harness, tmp_path_factory, tiny_model_dir,
                                                              team_stack):
    from distributed import Client

    from flows.sweep import cluster_runner, sweep_flow

    project = team_project(tmp_path_factory, tiny_model_dir, team_stack, MODEL + "-kill")
    procs: list = []
    killed = threading.Event()
    with team_cluster(tmp_path_factory, procs, team_stack) as address, flow_env(team_stack):
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
