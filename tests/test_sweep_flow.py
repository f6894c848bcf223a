"""The sweep flow end to end on a tiny model: a 2 x 2 grid through Prefect's process-pool task
runner, real DVC, a sqlite MLflow store; the Pareto-best passing candidate is promoted."""
from __future__ import annotations

import json
import os
import socket

import pytest
from helpers import client_for, make_project, tiny_recipe

from flows.cli import main as cli
from frugalflow.pareto import pareto_front

MODEL = "tiny-sweep"
GRID = ["stages.0.sparsity=0.2,0.6", "stages.1.bits=4,8"]


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir):
    recipe = tiny_recipe(tiny_model_dir, MODEL, gates={"max_ppl_increase_pct": 1000.0, "min_size_reduction": 4.0})
    return make_project(tmp_path_factory.mktemp("sweep"), recipe)


@pytest.fixture(scope="module")
def sweep(prefect_harness, project):
    from unittest import mock

    from flows.sweep import sweep_flow
    from frugalflow import recipe_io

    with mock.patch.object(recipe_io, "read_yaml", wraps=recipe_io.read_yaml) as reads:  # this process's parses
        result = sweep_flow(params=str(project / "params.yaml"), grid=GRID)
    return {**result, "recipe_reads": reads.call_count}


def test_the_flow_reads_its_recipe_once(sweep):
    """Four candidates, the grid and the project all come from one parse of params.yaml (it was 2N+5)."""
    assert sweep["recipe_reads"] == 1


def test_every_grid_point_is_a_child_run_with_metrics(sweep, project):
    client = client_for(project)
    runs = client.search_runs([client.get_experiment_by_name(MODEL).experiment_id],
                              f"tags.`frugalflow.sweep_run` = '{sweep['run_id']}'")
    assert sorted(r.info.run_name for r in runs) == sorted(
        ["sparsity=0.2,bits=4", "sparsity=0.2,bits=8", "sparsity=0.6,bits=4", "sparsity=0.6,bits=8"])
    for r in runs:
        assert r.info.status == "FINISHED"
        assert r.data.tags["mlflow.parentRunId"] == sweep["run_id"]
        assert {"ppl", "size_mb", "decode_tps"} <= set(r.data.metrics)
        point = json.loads(r.data.tags["frugalflow.assignment"])
        assert r.data.params["sweep.stages.1.bits"] == str(point["stages.1.bits"])
        stage_runs = client.search_runs([r.info.experiment_id], f"tags.`mlflow.parentRunId` = '{r.info.run_id}'")
        assert len(stage_runs) == 3  # magnitude, rtn, kl under each candidate
    # 8-bit weights are bigger than 4-bit ones, whatever the sparsity
    size = {r.info.run_name: r.data.metrics["size_mb"] for r in runs}
    assert size["sparsity=0.2,bits=8"] > size["sparsity=0.2,bits=4"]


def test_candidates_compute_in_parallel_worker_processes(sweep, project):
    client = client_for(project)
    experiment = client.get_experiment_by_name(MODEL).experiment_id
    candidates = {r.info.run_id for r in client.search_runs(
        [experiment], f"tags.`frugalflow.sweep_run` = '{sweep['run_id']}'")}
    stage_runs = [r for r in client.search_runs([experiment], "tags.`frugalflow.stage` != ''")
                  if r.data.tags.get("mlflow.parentRunId") in candidates]
    workers = {r.data.tags["frugalflow.worker"] for r in stage_runs}
    assert f"{socket.gethostname()}:{os.getpid()}" not in workers  # not computed in the flow's process
    assert len(workers) == 2  # sweep.max_parallel (2) worker processes
    # each prune stage is shared by two candidates (same sparsity, different bits): computed once
    prune = [r for r in stage_runs if r.data.tags["frugalflow.stage"] == "prune"]
    assert len(prune) == 4 and sorted(r.data.tags["frugalflow.cached"] for r in prune) == ["False", "False",
                                                                                          "True", "True"]


def test_the_pareto_best_passing_candidate_is_registered_and_champion(sweep, project):
    table = sweep["candidates"]
    metrics = [c["metrics"] for c in table]
    front = set(pareto_front(metrics, minimize=("ppl", "size_mb"), maximize=("decode_tps",)))
    assert [c["pareto"] for c in table] == [i in front for i in range(len(table))]
    # 8-bit candidates are about 3x smaller than the fp32 base model: the size gate (4x) fails them
    assert [c["passed"] for c in table] == [c["label"].endswith("bits=4") for c in table]
    eligible = [c for c in table if c["pareto"] and c["passed"]]
    best = min(eligible, key=lambda c: c["metrics"]["ppl"])
    assert sweep["selected"] == best["label"] and [c["selected"] for c in table].count(True) == 1

    client = client_for(project)
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert champion.run_id == best["run_id"]
    promotion = {k: v for k, v in sweep["promotion"].items() if k != "replaced"}  # the champion before it, if any
    assert promotion == {"registered": True, "version": str(champion.version), "champion": True}
    report = {a.path for a in client.list_artifacts(best["run_id"], "report")}
    assert "report/report.html" in report  # with the sweep's candidates in its Pareto plots
    sweep_run = client.get_run(sweep["run_id"])
    assert sweep_run.data.tags["frugalflow.selected_run"] == best["run_id"]
    assert {"sweep/candidates.json", "sweep/summary.md", "sweep/grid.json"} <= {
        a.path for d in ("sweep",) for a in client.list_artifacts(sweep["run_id"], d)}


def test_invalid_grid_point_is_refused_before_any_work(project, capsys):
    code = cli(["sweep", "-p", str(project / "params.yaml"), "-g", "stages.0.sparsity=0.5,1.5"])
    assert code == 2
    err = capsys.readouterr().err
    assert "sweep candidate sparsity=1.5" in err and "stages.0.sparsity" in err
    assert cli(["sweep", "-p", str(project / "params.yaml")]) == 2
    assert "no grid" in capsys.readouterr().err
