"""Retention (issue #40 item 2): `frugalflow gc` and the night's retention on real nightly flows on the tiny
model, under Prefect's test harness, with a real MLflow sqlite store, registry and local artifact store.

Six nights build the scene: versions 1-4 (objective size_mb: version 1 stays champion), then two nights
whose candidates fail their gates (other stage outputs, model files but no version); version 2 is promoted
by hand and version 1 back, so the champion history names both. With keep_challengers 1 and 0 days:
--dry-run lists exactly what goes and deletes nothing; gc while a `frugalflow run` is paused in a stage
keeps every stage output that run names (also one it has not reached yet) and deletes exactly the rest
that retention allows; once that run's process is gone its outputs go too; a version keeps the old stage
outputs its lineage points at; rollback and the champion's serving file still work; a night with
`retention.enabled` applies it at its end."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT, client_for, make_project, run_flow, stop, tail, tiny_recipe, wait_for

MODEL = "tiny-gc"
GC = ["-s", "retention.keep_challengers=1", "-s", "retention.stage_days=0", "-s", "retention.run_days=0"]
SECONDS: dict[str, float] = {}


def night(project: Path, name: str, overrides: list[str]) -> dict:
    started = time.monotonic()
    try:
        return run_flow(project, overrides)
    finally:
        SECONDS[name] = round(time.monotonic() - started, 1)


def versions(project: Path) -> list[int]:
    return sorted(int(v.version) for v in client_for(project).search_model_versions(f"name = '{MODEL}'"))


def stage_entries(project: Path) -> set[str]:
    """What is under artifacts/stages/ besides lock files."""
    return {p.name for p in (project / "artifacts" / "stages").iterdir() if not p.name.endswith(".lock")}


def files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()} if root.exists() else {}


def snapshot(project: Path) -> dict:
    client = client_for(project)
    return {"versions": versions(project), "stages": files(project / "artifacts"),
            "mlartifacts": files(project / "mlartifacts"),
            "logged models": sorted(m.model_id for m in client.search_logged_models(
                [e.experiment_id for e in client.search_experiments()]))}


def table(out: str) -> dict[tuple[str, str], tuple[str, str]]:
    """The plan table `gc` prints: (kind, name) -> (action, reason)."""
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("action"))
    starts = [lines[head].index(h) for h in ("action", "kind", "name", "MB", "reason")]
    rows = {}
    for line in lines[head + 2:]:
        if not line.startswith(("delete", "keep")):
            break
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None])]
        rows[(cells[1], cells[2])] = (cells[0], cells[4])
    return rows


def stage_names(result: dict) -> list[str]:
    return [Path(s["dir"]).name for s in result["stages"]]


def has_model_files(project: Path, run_id: str) -> bool:
    return {"model", "serving"} & {a.path for a in client_for(project).list_artifacts(run_id)} != set()


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir) -> Path:
    recipe = tiny_recipe(tiny_model_dir, MODEL, evaluation={"decode_race_rounds": 0},
                         registry={"model_name": MODEL, "objective": "size_mb"})
    return make_project(tmp_path_factory.mktemp("project"), recipe)


@pytest.fixture(scope="module")
def scene(prefect_harness, project):
    from tasks.registry import history, promote

    nights = {"v1": night(project, "v1", [])}
    for n in (2, 3, 4):
        nights[f"v{n}"] = night(project, f"v{n}", [f"stages.2.lr=0.000{n}"])
    nights["F"] = night(project, "failed", ["stages.0.sparsity=0.3", "gates.max_ppl=0.5"])
    nights["G"] = night(project, "failed again", ["stages.0.sparsity=0.3", "stages.2.lr=0.0005", "gates.max_ppl=0.5"])
    assert [nights[f"v{n}"]["promotion"]["version"] for n in (1, 2, 3, 4)] == ["1", "2", "3", "4"]
    assert not nights["F"]["promotion"]["registered"] and not nights["G"]["promotion"]["registered"]
    assert all(r["retention"] is None for r in nights.values())  # the recipe leaves retention off
    client = client_for(project)
    promote(client, MODEL, "2", "by hand", by="test")
    promote(client, MODEL, "1", "back", by="test")
    assert [e["version"] for e in history(client, MODEL)] == ["1", "2", "1"]
    yield nights
    print("\nseconds per night: " + ", ".join(f"{k} {v}" for k, v in SECONDS.items()))


def test_dry_run_lists_what_goes_and_deletes_nothing(scene, project, capsys):
    from flows.cli import main

    before = snapshot(project)
    assert main(["gc", "--dry-run", "-p", str(project / "params.yaml"), *GC]) == 0
    out = capsys.readouterr().out
    assert snapshot(project) == before
    rows = table(out)
    s = {k: stage_names(r) for k, r in scene.items()}
    assert {k: v for k, v in rows.items() if k[0] == "version"} == {
        ("version", "1"): ("keep", "champion"), ("version", "2"): ("keep", "named by the champion history"),
        ("version", "3"): ("delete", "older than the newest 1, never champion, no alias"),
        ("version", "4"): ("keep", "alias challenger")}
    doomed_stages = {s["v3"][2], *s["F"], s["G"][2]}
    assert {k[1] for k, v in rows.items() if k[0] == "stage" and v[0] == "delete"} == doomed_stages
    assert {k[1]: v for k, v in rows.items() if k[0] == "stage" and v[0] == "keep"} == {
        s["v1"][0]: ("keep", "used by version 1"), s["v1"][1]: ("keep", "used by version 1"),
        s["v1"][2]: ("keep", "used by version 1"), s["v2"][2]: ("keep", "used by version 2"),
        s["v4"][2]: ("keep", "used by version 4")}
    runs = {k[1]: v for k, v in rows.items() if k[0] == "run files"}
    assert runs == {scene["v1"]["run_id"]: ("keep", "run of version 1"),
                    scene["v2"]["run_id"]: ("keep", "run of version 2"),
                    scene["v3"]["run_id"]: ("delete", "run of deleted version 3"),
                    scene["v4"]["run_id"]: ("keep", "run of version 4"),
                    scene["F"]["run_id"]: runs[scene["F"]["run_id"]], scene["G"]["run_id"]: runs[scene["G"]["run_id"]]}
    assert runs[scene["F"]["run_id"]][0] == runs[scene["G"]["run_id"]][0] == "delete"
    assert runs[scene["F"]["run_id"]][1].startswith("no kept version, ended 0.0 days ago (keep 0)")
    assert "dry run: would delete 9 item(s)" in out and out.rstrip().endswith("nothing deleted")


class PausedRun:
    """`frugalflow run` in a subprocess on the harness's Prefect API, frozen at a pause point."""

    def __init__(self, project: Path, point: str, overrides: list[str]):
        from prefect.settings import PREFECT_API_URL

        self.marker, self.log = project / "paused", project / "paused-run.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FRUGALFLOW_", "PREFECT_API_URL"))}
        env.update(PREFECT_API_URL=PREFECT_API_URL.value(), FRUGALFLOW_TEST_PAUSE_AT=point,
                   FRUGALFLOW_TEST_PAUSE_FILE=str(self.marker))
        sets = [a for o in overrides for a in ("-s", o)]
        self.proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "-p", str(project / "params.yaml"),
                                      *sets], cwd=ROOT, env=env, stdout=open(self.log, "w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: self.marker.exists() or self.proc.poll() is not None, 600, 0.2)
        if not self.marker.exists():
            self.kill()
            pytest.fail(f"the run did not reach {point} (exit {self.proc.poll()}):\n{tail(self.log)}")

    def kill(self) -> None:
        stop(self.proc, signal.SIGKILL)


def test_gc_during_a_run_keeps_what_the_run_names(scene, project, capsys):
    """The run reuses F's prune output, computes its quantize output again (lost) and will reuse F's
    distillation output next: paused with the quantize output written to its temporary folder, not yet
    sealed, gc keeps all three (the temporary folder too) and deletes the rest."""
    from flows.cli import main
    from frugalflow.integrity import verify_manifest

    s = {k: stage_names(r) for k, r in scene.items()}
    stages = project / "artifacts" / "stages"
    shutil.rmtree(stages / s["F"][1])
    run = PausedRun(project, "stage1.save", ["stages.0.sparsity=0.3", "gates.max_ppl=0.5"])
    try:
        before = stage_entries(project)
        client = client_for(project)
        experiment = client.get_run(scene["v1"]["run_id"]).info.experiment_id
        [running] = [r for r in client.search_runs([experiment], "attributes.status = 'RUNNING'")
                     if "frugalflow.stage_dirs" in r.data.tags]
        assert main(["gc", "-p", str(project / "params.yaml"), *GC]) == 0
        out = capsys.readouterr().out
        rows = table(out)
        for name in (s["F"][0], s["F"][2]):  # reused already, and not reached yet
            assert rows[("stage", name)] == ("keep", f"used by running run {running.info.run_id[:8]}")
            verify_manifest(stages / name)
        assert any(name.startswith(f".{s['F'][1]}.tmp-") for name in before)  # the stage being written
        assert before - stage_entries(project) == {s["v3"][2], s["G"][2]}  # nothing of the run's touched
        assert versions(project) == [1, 2, 4]
        assert "deleted 1 version(s), 2 stage output(s), model files of 3 run(s)" in out
    finally:
        run.kill()
    # its process gone, the run holds nothing: its outputs go at the next gc
    assert main(["gc", "-p", str(project / "params.yaml"), *GC]) == 0
    capsys.readouterr()
    assert stage_entries(project) == {*s["v1"], s["v2"][2], s["v4"][2]}
    for key in ("v3", "F", "G"):  # model files deleted, the run says when and why; its record stays
        run_id = scene[key]["run_id"]
        assert not has_model_files(project, run_id)
        assert "deleted model/" in client_for(project).get_run(run_id).data.tags["frugalflow.gc"]
        assert client_for(project).get_run(run_id).data.metrics
    for key in ("v1", "v2", "v4"):
        assert has_model_files(project, scene[key]["run_id"])


def test_a_version_keeps_the_old_stage_outputs_it_points_at(scene, project):
    """100 days on, with 14 days of stage retention: every stage output left is one a kept version's lineage
    names, so none goes; nothing else is left to delete either."""
    from frugalflow.config import RetentionConfig
    from frugalflow.retention import DAY_S
    from tasks.retention import make_plan

    s = {k: stage_names(r) for k, r in scene.items()}
    plan = make_plan(client_for(project), MODEL, project / "artifacts", RetentionConfig(keep_challengers=1),
                     now=time.time() + 100 * DAY_S)
    assert plan.to_delete == []
    reasons = {d.name: d.reason for d in plan.decisions if d.kind == "stage"}
    assert reasons == {s["v1"][0]: "used by version 1", s["v1"][1]: "used by version 1",
                       s["v1"][2]: "used by version 1", s["v2"][2]: "used by version 2", s["v4"][2]: "used by version 4"}


def test_after_gc_rollback_and_the_champions_files_work(scene, project, tmp_path):
    from tasks.registry import rollback
    from tasks.serving import fetch

    client = client_for(project)
    entry = rollback(client, MODEL, "after gc")
    assert (entry["previous"], entry["version"]) == ("1", "2")
    got = fetch(client, f"models:/{MODEL}@champion", "gguf", tmp_path / "m.gguf")
    assert got["attached"] and got["version"] == "2" and got["bytes"] > 0


def test_a_night_applies_retention_at_its_end(scene, project):
    result = night(project, "with retention", ["stages.2.lr=0.0006", "retention.enabled=true",
                                               "retention.keep_challengers=1", "retention.stage_days=0",
                                               "retention.run_days=0"])
    assert result["promotion"]["version"] == "5" and not result["promotion"]["champion"]
    retention = result["retention"]
    assert sorted(retention["deleted"]) == sorted(["version 4", f"run files {scene['v4']['run_id']}",
                                                   f"stage {stage_names(scene['v4'])[2]}"])
    assert retention["skipped"] == []
    assert client_for(project).get_run(result["run_id"]).data.tags["frugalflow.retention"] == retention["summary"]
    assert retention["summary"].startswith("deleted 1 version(s), 1 stage output(s), model files of 1 run(s): ")
    assert versions(project) == [1, 2, 5]
    assert {*stage_names(result)} <= stage_entries(project)  # the night's own, used by version 5


@pytest.mark.parametrize("args, code, words", [
    (["-s", "retention.keep_challengers=-1"], 2, "retention.keep_challengers"),
    (["--tracking-uri", "http://127.0.0.1:9"], 4, "cannot reach the MLflow tracking store"),
])
def test_gc_refuses_clearly(args, code, words, tmp_path, capsys):
    from flows.cli import main

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    assert main(["gc", "-p", str(tmp_path / "params.yaml"), *args]) == code
    assert words in capsys.readouterr().err
