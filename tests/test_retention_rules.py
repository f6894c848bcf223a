"""Retention's rules on plain facts (frugalflow/retention.py) and which running runs hold stage outputs
(tasks/retention.py `running_stages`, on a real sqlite MLflow store); the flows themselves are in
tests/test_gc.py."""
from __future__ import annotations

import json

import pytest

from frugalflow.retention import DAY_S, Facts, RunFiles, Stage, Version, decide

NOW = 1_900_000_000.0


def by_name(decisions, kind: str) -> dict[str, tuple[bool, str]]:
    return {d.name: (d.delete, d.reason) for d in decisions if d.kind == kind}


def test_version_rules_in_order():
    versions = [Version(1, runs=("r1",)), Version(2, aliases=("champion",), runs=("r2",)), Version(3, runs=("r3",)),
                Version(4, aliases=("staging",), runs=("r4",)), Version(5, runs=("r5",), running=True),
                Version(6, runs=("r6",)), Version(7, runs=("r7",)), Version(8, runs=("r8",))]
    got = by_name(decide(Facts(versions, history=frozenset({"1", "2"})), 2, 14, 14, NOW), "version")
    assert got == {"1": (False, "named by the champion history"), "2": (False, "champion"),
                   "3": (True, "older than the newest 2, never champion, no alias"), "4": (False, "alias staging"),
                   "5": (False, "its run is running"),
                   "6": (True, "older than the newest 2, never champion, no alias"),
                   "7": (False, "among the newest 2"), "8": (False, "among the newest 2")}
    # keep_challengers 0: only what is protected otherwise
    zero = by_name(decide(Facts(versions, history=frozenset({"1", "2"})), 0, 14, 14, NOW), "version")
    assert sorted(n for n, (delete, _) in zero.items() if not delete) == ["1", "2", "4", "5"]


def test_stages_kept_by_kept_versions_running_runs_and_age():
    old, recent = NOW - 20 * DAY_S, NOW - 2 * DAY_S
    versions = [Version(1, aliases=("champion",), stages=("0-a-1", "1-b-1")), Version(2, stages=("1-b-2",))]
    stages = [Stage("0-a-1", old, 10), Stage("1-b-1", old, 20), Stage("1-b-2", old, 30), Stage("1-b-3", old, 40),
              Stage("1-b-4", recent, 50), Stage("1-b-5", old, 60)]
    facts = Facts(versions, stages=stages, running_stages={"1-b-5": "abcd1234"})
    got = by_name(decide(facts, 0, 14, 14, NOW), "stage")
    assert got["0-a-1"] == (False, "used by version 1") and got["1-b-1"] == (False, "used by version 1")
    assert got["1-b-2"] == (True, "unused by kept versions, last used 20.0 days ago (keep 14)")  # version 2 goes
    assert got["1-b-3"][0] and got["1-b-4"] == (False, "last used 2.0 days ago (keep 14)")
    assert got["1-b-5"] == (False, "used by running run abcd1234")
    deleted = [d for d in decide(facts, 0, 14, 14, NOW) if d.kind == "stage" and d.delete]
    assert sum(d.bytes for d in deleted) == 30 + 40
    # a running run that named nothing: every stage output not otherwise kept stays, saying why
    held = by_name(decide(Facts(versions, stages=stages, hold="run x is running"), 0, 14, 14, NOW), "stage")
    assert held["1-b-3"] == (False, "run x is running") and held["0-a-1"] == (False, "used by version 1")


def test_run_files_of_deleted_versions_go_at_once_others_after_their_days():
    versions = [Version(1, aliases=("champion",), runs=("r1",)), Version(2, runs=("r2", "r2b")),
                Version(3, runs=("r3",))]
    runs = [RunFiles("r1", NOW - 30 * DAY_S), RunFiles("r2", NOW - DAY_S), RunFiles("r2b", NOW - DAY_S),
            RunFiles("r3", NOW - DAY_S), RunFiles("failed-old", NOW - 30 * DAY_S),
            RunFiles("failed-new", NOW - DAY_S), RunFiles("open", NOW - 30 * DAY_S, running=True)]
    got = by_name(decide(Facts(versions, runs=runs), 1, 14, 14, NOW), "run files")
    assert got == {"r1": (False, "run of version 1"), "r2": (True, "run of deleted version 2"),
                   "r2b": (True, "run of deleted version 2"), "r3": (False, "run of version 3"),
                   "failed-old": (True, "no kept version, ended 30.0 days ago (keep 14)"),
                   "failed-new": (False, "ended 1.0 days ago (keep 14)"), "open": (False, "running")}


def test_a_run_shared_with_a_kept_version_keeps_its_files():
    """A version adopted by the run of another (kept) version: the run's files stay."""
    versions = [Version(1, aliases=("champion",), runs=("r1", "shared")), Version(2, runs=("shared",))]
    got = by_name(decide(Facts(versions, runs=[RunFiles("shared", NOW - 99 * DAY_S)]), 0, 0, 0, NOW), "run files")
    assert got == {"shared": (False, "run of version 1")}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """One sqlite store for the module (creating one takes seconds); each test uses its own names."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_which_running_runs_hold_stage_outputs(client):
    """Only live frugalflow runs count: a run naming its stage outputs holds those, a stage run its own,
    a frugalflow run naming none holds every one; a foreign run, a finished one and one whose process is
    gone hold nothing."""
    import time

    from tasks.retention import STAGE_DIRS, running_stages
    from tasks.runstate import process_tags

    exp = client.create_experiment("running")
    mine = process_tags()
    dead = {**mine, "frugalflow.owner": f"{mine['frugalflow.host']}:999999999:1", "frugalflow.pid": "999999999"}

    def open_run(name: str, tags: dict) -> str:
        return client.create_run(exp, run_name=name, tags=tags).info.run_id

    named = open_run("night", {**mine, STAGE_DIRS: json.dumps(["0-magnitude-aa", "1-rtn-bb"])})
    open_run("1-quantize-rtn", {**mine, "frugalflow.stage": "quantize", "frugalflow.method": "rtn",
                                "frugalflow.key": "cc"})
    open_run("notebook", {"mlflow.user": "someone"})
    open_run("dead night", {**dead, "frugalflow.recipe": "r"})
    client.set_terminated(open_run("done", {**mine, "frugalflow.recipe": "r"}), "FINISHED")

    def current():
        return running_stages(client.search_runs([exp], max_results=100), time.time())  # this experiment only

    running, hold = current()
    assert running == {"0-magnitude-aa": named[:8], "1-rtn-bb": named[:8], "1-rtn-cc": running["1-rtn-cc"]}
    assert hold is None
    silent = open_run("sweep", {**mine, "frugalflow.recipe": "r"})
    running, hold = current()
    assert hold == f"run {silent[:8]} (sweep) is running and has not named the stage outputs it uses"
    client.set_terminated(silent, "FINISHED")
    assert current()[1] is None


def test_apply_looks_again_before_deleting(client, tmp_path):
    """A version promoted between the plan and the deletion stays; a stage output whose lock is held (a
    stage reusing it) stays, and goes at the next gc; a stage output's checkpoint and quarantined copy go
    with it, its lock file stays."""
    import os
    import time

    from filelock import FileLock

    from frugalflow.config import RetentionConfig
    from tasks.registry import promote
    from tasks.retention import apply, make_plan

    client.create_registered_model("m-apply")
    for _ in range(3):
        client.create_model_version("m-apply", "file:///nowhere")
    promote(client, "m-apply", "3", "first")
    stages = tmp_path / "artifacts" / "stages"
    name = "0-magnitude-0123456789abcdef"
    for entry in (name, f"{name}.ckpt", f"{name}.corrupt-a1b2c3"):
        (stages / entry).mkdir(parents=True)
        (stages / entry / "weights").write_bytes(b"x" * 1000)
        os.utime(stages / entry, (time.time() - 9 * 86400,) * 2)
    cfg = RetentionConfig(keep_challengers=0, stage_days=7)
    plan = make_plan(client, "m-apply", tmp_path / "artifacts", cfg)
    assert {(d.kind, d.name) for d in plan.to_delete} == {("version", "1"), ("version", "2"), ("stage", name)}
    assert plan.bytes == 3000
    promote(client, "m-apply", "1", "by hand, after the plan")
    with FileLock(str(stages / name) + ".lock"):
        outcome = apply(client, plan)
    assert [(d.name, d.reason) for d in outcome.skipped] == [("1", "alias champion since the plan"),
                                                             (name, "in use (its lock is held)")]
    assert [d.name for d in outcome.deleted] == ["2"]
    assert sorted(int(v.version) for v in client.search_model_versions("name = 'm-apply'")) == [1, 3]
    again = apply(client, make_plan(client, "m-apply", tmp_path / "artifacts", cfg))
    assert [(d.kind, d.name) for d in again.deleted] == [("stage", name)] and again.bytes == 3000
    assert sorted(p.name for p in stages.iterdir()) == [f"{name}.lock"]


def test_a_failed_retention_leaves_the_night_as_it_was(client, tmp_path, monkeypatch, caplog):
    """The night's retention step: off -> nothing; a failure -> a warning and the run's tag, no exception."""
    from helpers import ROOT

    import flows.retention as night
    from frugalflow.config import Recipe, RetentionConfig
    from frugalflow.recipe_io import load_recipe

    assert load_recipe(ROOT / "params.yaml").retention.enabled  # on in the default recipe
    off = Recipe.model_validate({"stages": [{"method": "rtn", "bits": 4}]})
    assert not off.retention.enabled and off.retention == RetentionConfig()  # off in a recipe without the section
    run_id = client.create_run(client.create_experiment("night")).info.run_id
    assert night.night_retention(off, client.tracking_uri, tmp_path, run_id) is None

    def broken(*args, **kwargs):
        raise RuntimeError("artifact store refused")

    monkeypatch.setattr(night, "retention_task", broken)
    on = off.model_copy(update={"retention": RetentionConfig(enabled=True)})
    result = night.night_retention(on, client.tracking_uri, tmp_path, run_id)
    assert result["summary"] == "failed: RuntimeError: artifact store refused" and result["deleted"] == []
    assert client.get_run(run_id).data.tags["frugalflow.retention"] == result["summary"]
    assert "retention failed, the night's result stands: RuntimeError: artifact store refused" in caplog.text
