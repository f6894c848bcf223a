"""Failure paths of the flows on the tiny project (real Prefect, DVC, MLflow): a stage that raises
fails its run and its parent, writes no passing verdict and registers nothing; a sweep with a
broken candidate finishes the others and promotes the best passing one; a sweep where nothing
passes promotes nothing and says so. (tests/test_sweep_flow.py covers the sweep that succeeds.)"""
from __future__ import annotations

import pytest
from helpers import client_for, make_project, run_flow, tiny_recipe

NAME = "tiny-failures"


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir, prefect_harness):
    recipe = tiny_recipe(tiny_model_dir, NAME, gates={"max_ppl_increase_pct": 1000.0, "min_size_reduction": 2.0})
    return make_project(tmp_path_factory.mktemp("failures"), recipe)


def runs_of(client, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def test_a_stage_that_raises_fails_its_runs_and_registers_nothing(project, monkeypatch):
    from frugalflow.quant import rtn

    def broken(stage, model_dir, out_dir, ctx):
        out_dir.mkdir(parents=True)
        (out_dir / "model.safetensors").write_bytes(b"half")  # a partial output, then the failure
        raise RuntimeError("injected failure in the rtn stage")

    monkeypatch.setattr(rtn, "run", broken)
    with pytest.raises(RuntimeError, match="injected failure"):
        run_flow(project, ["registry.model_name=tiny-broken-stage"])
    client = client_for(project)
    runs = runs_of(client, NAME)
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FAILED" and "injected failure" in parent.data.tags["frugalflow.failure"]
    assert "frugalflow.verdict" not in parent.data.tags
    assert "verdict.json" not in {a.path for a in client.list_artifacts(parent.info.run_id)}
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"0-prune-magnitude", "1-quantize-rtn"}  # distillation never started
    assert children["0-prune-magnitude"].info.status == "FINISHED"
    assert children["1-quantize-rtn"].info.status == "FAILED"
    assert "injected failure" in children["1-quantize-rtn"].data.tags["frugalflow.failure"]
    assert not client.search_registered_models()
    stages_dir = project / "artifacts" / "stages"
    assert not [p for p in stages_dir.iterdir() if p.name.startswith(("1-rtn", ".1-rtn")) and p.suffix != ".lock"]


def test_a_sweep_with_a_broken_candidate_promotes_the_best_passing_one(project):
    from flows.sweep import sweep_flow, sweep_runner

    # group_size 128 passes the schema but not the tiny model, whose q_proj has 64 inputs: that
    # candidate fails while computing, in its worker process
    result = sweep_flow.with_options(task_runner=sweep_runner(1))(
        params=str(project / "params.yaml"), grid=["stages.1.group_size=32,128"],
        overrides=["registry.model_name=tiny-sweep-broken"])
    table = {c["label"]: c for c in result["candidates"]}
    assert set(table) == {"group_size=32", "group_size=128"}
    assert "group_size 128" in table["group_size=128"]["error"] and table["group_size=128"]["metrics"] is None
    assert table["group_size=32"]["passed"] and table["group_size=32"]["selected"]
    assert result["selected"] == "group_size=32" and result["promotion"]["registered"]
    client = client_for(project)
    broken, good = client.get_run(table["group_size=128"]["run_id"]), client.get_run(table["group_size=32"]["run_id"])
    assert broken.info.status == "FAILED" and "group_size 128" in broken.data.tags["frugalflow.failure"]
    assert good.info.status == "FINISHED"
    sweep = client.get_run(result["run_id"])
    assert sweep.info.status == "FINISHED" and sweep.data.tags["frugalflow.selected"] == "group_size=32"
    champion = client.get_model_version_by_alias("tiny-sweep-broken", "champion")
    assert champion.run_id == good.info.run_id
    assert len(client.search_model_versions("name = 'tiny-sweep-broken'")) == 1


def test_a_sweep_where_nothing_passes_promotes_nothing_and_says_so(project):
    from flows.sweep import sweep_flow, sweep_runner

    result = sweep_flow.with_options(task_runner=sweep_runner(1))(
        params=str(project / "params.yaml"), grid=["stages.1.bits=4,8"],
        overrides=["registry.model_name=tiny-sweep-none", "gates.min_size_reduction=1000"])
    assert result["selected"] is None and result["promotion"] == {"registered": False, "version": None,
                                                                  "champion": False}
    assert all(c["passed"] is False and c["error"] is None for c in result["candidates"])
    client = client_for(project)
    sweep = client.get_run(result["run_id"])
    assert sweep.info.status == "FINISHED" and sweep.data.tags["frugalflow.selected"] == "none"
    summary = client.download_artifacts(result["run_id"], "sweep/summary.md")
    assert open(summary).read().count("| FAIL |") == 2
    assert "tiny-sweep-none" not in {m.name for m in client.search_registered_models()}
