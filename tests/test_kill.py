"""Kill -9 anywhere, then rerun: `frugalflow run` as a real subprocess on the tiny project, frozen at
a chosen point and sent SIGKILL, then run again, five times over, each rerun killed at the next
point, the sixth run completing.

The points are made deterministic with the hook in frugalflow/pausepoints.py: with
FRUGALFLOW_TEST_PAUSE_AT=<point> the run writes FRUGALFLOW_TEST_PAUSE_FILE and sleeps there until
killed; unset (as in every real run) the hook does nothing. Only the run's main process is killed,
as the OOM killer would; its temporary Prefect server survives it until the rerun stops it.

Checked: a rerun reuses every finished stage and never a partial one; distillation resumes from its
checkpoint and ends with weights bitwise equal to an uninterrupted distillation with the same seed
(CPU); every killed run's MLflow runs end FAILED with a tag saying why; no registry version is
duplicated (the rerun adopts the version that the run killed during registration created); no
process a killed run started outlives the rerun's start. `frugalflow ui` stops its MLflow server
on SIGTERM and on SIGINT; `frugalflow run` sent SIGTERM or SIGINT with its whole process group
records its crash, closes its runs FAILED and exits 143 / 130 within seconds.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT, client_for, free_port, make_project, tail, tiny_recipe, wait_for, wait_healthy
from safetensors.torch import load_file

MODEL = "tiny-kill"
POINTS = ["stage0.compute", "stage1.save", "stage2.step2", "evaluate.candidate", "register"]


def owned_by(pid: int) -> list[int]:
    """Processes whose FRUGALFLOW_OWNER names `pid` (what that run started: its Prefect server, ...)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        owner = next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"FRUGALFLOW_OWNER=")), "")
        if owner.split(":")[1:2] == [str(pid)] and state != "Z":
            found.append(int(entry.name))
    return found


def kill_with_what_it_started(pid: int) -> None:
    """SIGKILL the process group of `pid` and of every process it owns (its servers have their own)."""
    for group in [pid, *owned_by(pid)]:
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _sigint_default() -> None:
    """As from a terminal: an xdist worker may have SIGINT ignored, which a child inherits (Python
    then raises no KeyboardInterrupt: the child never sees Ctrl-C)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Runs:
    """`frugalflow run` subprocesses on one project, each frozen at a point and killed."""

    def __init__(self, project: Path):
        self.project, self.procs, self.n = project, [], 0

    def start(self, point: str | None, api: str | None = None) -> tuple[subprocess.Popen, Path, Path]:
        """`api`: a running Prefect API to use; None: the run starts its own temporary server."""
        self.n += 1
        marker, log = self.project / f"paused-{self.n}", self.project / f"run-{self.n}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FRUGALFLOW_", "PREFECT_API_URL"))}
        env["PREFECT_HOME"] = str(self.project / ".prefect")  # this project's own ephemeral API database
        env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"  # a loaded 2-core machine is slow
        if api:
            env["PREFECT_API_URL"] = api
        if point:
            env.update(FRUGALFLOW_TEST_PAUSE_AT=point, FRUGALFLOW_TEST_PAUSE_FILE=str(marker))
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "-p", str(self.project / "params.yaml")],
                                cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_sigint_default)
        self.procs.append(proc)
        return proc, marker, log

    def kill_at(self, point: str, api: str | None, timeout: float = 600) -> int:
        proc, marker, log = self.start(point, api)
        reached = wait_for(lambda: marker.exists() or proc.poll() is not None, timeout, 0.2)
        if not marker.exists():
            pytest.fail(f"run did not reach {point} (exit {proc.poll()}):\n{tail(log)}")
        assert marker.read_text().split() == [point, str(proc.pid)] and reached
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        return proc.pid

    def cleanup(self) -> None:
        for proc in self.procs:
            kill_with_what_it_started(proc.pid)


@pytest.fixture(scope="module")
def killed(tmp_path_factory, tiny_model_dir, prefect_harness):
    """Five runs killed at the five points in turn, then a sixth that completes; what each left.
    The first run starts its own temporary Prefect server (which outlives the kill until the next
    run stops it); the others use the test harness's API, which saves a server start per run."""
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    recipe = tiny_recipe(tiny_model_dir, MODEL, stages=[
        {"method": "wanda", "sparsity": 0.5},
        {"method": "rtn", "bits": 4, "group_size": 32},
        {"method": "kl", "steps": 4, "batch_size": 2, "seq_len": 32, "lr": 1e-3, "checkpoint_every": 1},
    ])
    project = make_project(tmp_path_factory.mktemp("kill"), recipe)
    runs = Runs(project)
    seen: dict = {"pids": [], "left_behind": [], "stages": []}
    stages_dir = project / "artifacts" / "stages"
    try:
        for n, point in enumerate(POINTS):
            pid = runs.kill_at(point, api if n else None)
            seen["pids"].append(pid)
            seen["left_behind"].append(owned_by(pid))
            seen["stages"].append(sorted(p.name for p in stages_dir.iterdir()) if stages_dir.is_dir() else [])
            if point == "stage2.step2":
                ckpt = next(stages_dir.glob("2-kl-*.ckpt"))
                seen["checkpoint_files"] = sorted(p.name for p in ckpt.iterdir())
        proc, _, log = runs.start(None, api)
        proc.wait(900)
        seen["final_log"] = log.read_text()
        assert proc.returncode == 0, tail(log)
        seen["after"] = {pid: owned_by(pid) for pid in seen["pids"]}
        yield project, seen
    finally:
        runs.cleanup()


def stage_runs(client, parent_id: str) -> list:
    exp = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_id}'")


def test_killed_runs_leave_no_partial_output_and_the_rerun_reuses_finished_stages(killed):
    project, seen = killed
    names = seen["stages"]
    # killed during wanda's calibration: no output, only its lock
    assert not [n for n in names[0] if n.startswith("0-wanda") and not n.endswith(".lock")]
    # killed while rtn wrote its output: a temporary folder, never the entry itself
    assert any(n.startswith(".1-rtn-") and ".tmp-" in n for n in names[1])
    assert not [n for n in names[1] if n.startswith("1-rtn-") and not n.endswith(".lock")]
    # the next run removed it and sealed a complete entry; distillation was killed after step 2
    assert not [n for n in names[2] if ".tmp-" in n]
    assert seen["checkpoint_files"] == ["distill_state.pt"]
    final = (project / "artifacts" / "stages")
    for entry in final.iterdir():
        assert ".tmp-" not in entry.name and ".corrupt-" not in entry.name, entry.name
    log = seen["final_log"]
    for index, method in enumerate(("wanda", "rtn", "kl")):
        assert f"stage {index} {method}: reusing" in log, f"stage {index} was not reused:\n{log[-3000:]}"


def test_distillation_resumed_and_matches_an_uninterrupted_run_bitwise(killed, tmp_path):
    from frugalflow.config import KLDistill
    from frugalflow.integrity import verify_manifest
    from frugalflow.recipe_io import load_recipe
    from frugalflow.stages import run_stage

    project, _ = killed
    stages = project / "artifacts" / "stages"
    [rtn] = [p for p in stages.glob("1-rtn-*") if p.is_dir()]
    [kl] = [p for p in stages.glob("2-kl-*") if p.is_dir()]
    verify_manifest(kl)
    stats = json.loads((kl / "stats.json").read_text())
    assert stats["resumed_from"] == 2 and stats["steps_run"] == 2  # steps 3 and 4 after the kill
    recipe = load_recipe(project / "params.yaml")
    stage = recipe.stages[2]
    assert isinstance(stage, KLDistill)
    run_stage(stage, rtn, tmp_path / "reference", data_dir=project / "data", teacher_dir=project / "models" / "base",
              seed=recipe.seed, checkpoint_dir=None, pruned=True)
    ours, reference = load_file(kl / "model.safetensors"), load_file(tmp_path / "reference" / "model.safetensors")
    assert ours.keys() == reference.keys()
    differ = [k for k in ours if not (ours[k].dtype == reference[k].dtype and ours[k].equal(reference[k]))]
    assert not differ, f"resumed weights differ from an uninterrupted run in {differ[:5]}"


def test_every_killed_run_is_closed_failed_with_the_reason(killed):
    project, seen = killed
    client = client_for(project)
    exp = client.get_experiment_by_name(MODEL).experiment_id
    parents = [r for r in client.search_runs([exp], order_by=["attributes.start_time ASC"])
               if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 6
    assert not client.search_runs([exp], "attributes.status = 'RUNNING'")
    for run, pid in zip(parents[:5], seen["pids"]):
        assert run.info.status == "FAILED"
        assert run.data.tags["frugalflow.pid"] == str(pid) and run.data.tags["frugalflow.host"] == socket.gethostname()
        assert run.data.tags["frugalflow.failure"].startswith("killed: its process")
        for child in stage_runs(client, run.info.run_id):
            assert child.info.status in ("FINISHED", "FAILED")
            if child.info.status == "FAILED":
                assert "killed" in child.data.tags["frugalflow.failure"]
    assert parents[5].info.status == "FINISHED" and parents[5].data.tags["frugalflow.verdict"] == "pass"


def test_no_registry_version_is_duplicated_or_promoted_from_a_killed_run(killed):
    """The run killed during registration created version 1 and died; the rerun of the same
    candidate adopted it (one version, promoted on the finished run's metrics), not a second."""
    project, seen = killed
    client = client_for(project)
    versions = client.search_model_versions(f"name = '{MODEL}'")
    assert [str(v.version) for v in versions] == ["1"], [(v.version, v.run_id, v.tags) for v in versions]
    [version] = versions
    killed_run, final_run = client.get_run(version.run_id), None
    assert killed_run.info.status == "FAILED" and killed_run.data.tags["frugalflow.pid"] == str(seen["pids"][-1])
    final_run = client.get_run(version.tags["frugalflow.adopted_by_run"])
    assert final_run.info.status == "FINISHED" and final_run.data.tags["frugalflow.registered_version"] == "1"
    assert version.tags["frugalflow.registered_by_killed_run"].startswith(f"{killed_run.info.run_id}: killed")
    assert "frugalflow.run_failed" not in version.tags
    assert version.tags["frugalflow.model_key"].startswith("2-kl-")
    assert sorted(client.get_model_version(MODEL, "1").aliases) == ["challenger", "champion"]
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert str(champion.version) == "1" and champion.tags["champion_reason"] == "first passing candidate"


def test_processes_a_killed_run_started_are_stopped_by_the_rerun(killed):
    _, seen = killed
    assert any(seen["left_behind"]), "a killed run left its temporary Prefect server running (expected here)"
    assert not any(seen["after"].values()), f"still running after the reruns: {seen['after']}"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_ui_stops_its_mlflow_server_on(sig, tmp_path):
    (tmp_path / "params.yaml").write_text("name: ui\nstages: [{method: rtn}]\n")
    port = free_port()
    log = tmp_path / "ui.log"
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "ui", "-p", str(tmp_path / "params.yaml"),
                             "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--port", str(port)],
                            cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "MLFLOW_WORKERS": "1"}, preexec_fn=_sigint_default)
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}/health", log, "frugalflow ui", 300)
        os.kill(proc.pid, sig)  # to the CLI process only, as `kill` or a service manager sends it
        try:
            assert proc.wait(60) == 0, tail(log)
        except subprocess.TimeoutExpired:  # seen once in a full CI run under load: keep what it was doing
            tree = subprocess.run(["ps", "-o", "pid,ppid,stat,etime,args", "-g", str(proc.pid)],
                                  capture_output=True, text=True).stdout
            pytest.fail(f"the UI did not exit within 60 s of {sig.name}\n{tree}\n{tail(log)}")
        time.sleep(0.5)
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, "the MLflow server still listens after the UI stopped"
        assert "MLflow UI stopped" in log.read_text()
        assert not owned_by(proc.pid), "processes the UI started outlived it"
    finally:
        kill_with_what_it_started(proc.pid)


@pytest.mark.parametrize("sig,code,said", [(signal.SIGTERM, 143, "stopped (SIGTERM)"),
                                           (signal.SIGINT, 130, "interrupted (SIGINT)")], ids=["SIGTERM", "SIGINT"])
def test_a_run_signalled_with_its_process_group_stops_at_once_and_records_it(sig, code, said, tmp_path,
                                                                               tiny_model_dir):
    """Ctrl-C in a terminal, `timeout` or a service manager signal the whole process group, Prefect's
    temporary API server included. The run must still report its crash to that server, close its
    MLflow runs FAILED, stop the server and exit with the signal's status, in seconds (with the
    server in the CLI's group it died first: 150 s of retries, then exit 4 'Prefect API cannot be
    reached')."""
    project = make_project(tmp_path, tiny_recipe(tiny_model_dir, MODEL, stages=[{"method": "wanda", "sparsity": 0.5}]))
    runs = Runs(project)
    try:
        proc, marker, log = runs.start("stage0.compute")  # its own temporary Prefect server
        wait_for(lambda: marker.exists() or proc.poll() is not None, 600, 0.2)
        assert marker.exists(), f"run did not reach stage0.compute (exit {proc.poll()}):\n{tail(log)}"
        signalled = time.monotonic()
        os.killpg(proc.pid, sig)
        assert proc.wait(120) == code, tail(log)
        took = time.monotonic() - signalled
        text = log.read_text()
        assert took < 60, f"{took:.0f} s from {sig.name} to exit\n{tail(log)}"
        assert f"frugalflow run: {said}" in text and "Traceback" not in text, tail(log)
        assert "Finished in state Crashed" in text and "Error logging to API" not in text, tail(log)
        assert not owned_by(proc.pid), "processes the run started outlived it"
        client = client_for(project)
        exp = client.get_experiment_by_name(MODEL).experiment_id
        statuses = [r.info.status for r in client.search_runs([exp])]
        assert statuses and set(statuses) == {"FAILED"}, statuses
    finally:
        runs.cleanup()
