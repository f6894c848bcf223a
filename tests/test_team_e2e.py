"""Team mode end to end, everything real and started here (the `team_stack` fixture: `frugalflow
team up` on free loopback ports): the nightly deployment from infra/prefect.yaml, triggered twice
through the Prefect API on two tiny projects, is picked up and run by the team's worker (not this
process); runs, params and metrics land in PostgreSQL through the MLflow server (read back with SQL),
model, report and plots in the MLflow S3 bucket (read back with boto3); the registry holds
`challenger`/`champion`; `team down` leaves no process and `team up` again loses nothing;
`mlflow models serve -m models:/NAME@champion` against the server answers a prompt; `frugalflow runs,
compare, promote, rollback --tracking-uri` work from another folder; in a browser both UIs ask for a
login (MLflow's HTTP login answered with the reader account, Prefect's login form filled in)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import psutil
import pytest
from browser import CHROMIUM, Browser
from helpers import ROOT, free_port, post, tail, wait_for
from team_stack import NIGHTLY_MODEL, nightly_runs

NAME = NIGHTLY_MODEL
SERVE_S = 180
pytestmark = pytest.mark.slow


def prefect(stack):
    return stack.prefect()


def mlflow_client(stack):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=stack.mlflow_uri, registry_uri=stack.mlflow_uri)


@pytest.fixture(scope="module")
def runs(team_stack, tiny_model_dir):
    """The session's two deployment runs (tests/team_stack.py `nightly_runs`: sparsity 0.5 and 0.3,
    one tiny project each, triggered at once); both must reach COMPLETED. {flow_run_id: (project,
    flow_run)} in trigger order."""
    return nightly_runs(team_stack, tiny_model_dir)


def test_runs_were_executed_by_the_worker_from_the_deployment(team_stack, runs):
    with prefect(team_stack) as client:
        deployment = client.read_deployment_by_name("frugalflow-nightly/nightly")
        workers = client.read_workers_for_work_pool(team_stack.work_pool)
    assert deployment.work_pool_name == team_stack.work_pool == "gpu"
    assert deployment.pull_steps == [{"prefect.deployments.steps.set_working_directory":
                                      {"directory": "{{ $FRUGALFLOW_PROJECT_DIR }}"}}]
    assert deployment.schedules and deployment.schedules[0].schedule.cron  # infra/prefect.yaml's cron
    assert [w.name for w in workers if str(w.status.value).upper() == "ONLINE"]
    for run_id, (project, run) in runs.items():
        assert run.deployment_id == deployment.id and run.work_pool_name == "gpu"
        assert run.parameters["params"] == str(project / "params.yaml")
        # the process that ran it was the worker's child (a `prefect flow-run execute` of its own)
        assert run.infrastructure_pid and str(os.getpid()) not in run.infrastructure_pid


def test_runs_params_and_metrics_are_rows_in_postgresql(team_stack, runs):
    with team_stack.sql("mlflow") as conn, conn.cursor() as cur:
        for flow_run_id in runs:
            cur.execute("SELECT r.run_uuid, r.status FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                        "WHERE t.key = 'prefect.flow_run_id' AND t.value = %s", (flow_run_id,))
            rows = cur.fetchall()
            assert len(rows) == 1 and rows[0][1] == "FINISHED", rows
            run_uuid = rows[0][0]
            cur.execute("SELECT value FROM params WHERE run_uuid = %s AND key = 'registry.model_name'", (run_uuid,))
            assert cur.fetchall() == [(NAME,)]
            cur.execute("SELECT key, value FROM latest_metrics WHERE run_uuid = %s AND key IN "
                        "('baseline.ppl', 'candidate.ppl')", (run_uuid,))
            metrics = dict(cur.fetchall())
            assert set(metrics) == {"baseline.ppl", "candidate.ppl"} and all(v > 1 for v in metrics.values())
        cur.execute("SELECT version FROM model_versions WHERE name = %s ORDER BY version", (NAME,))
        assert cur.fetchall() == [(1,), (2,)]
        cur.execute("SELECT alias FROM registered_model_aliases WHERE name = %s", (NAME,))
        assert {"champion", "challenger"} <= {a for (a,) in cur.fetchall()}


def test_model_report_and_plots_are_objects_in_the_mlflow_bucket(team_stack, runs):
    s3 = team_stack.s3("mlflow")
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=team_stack.buckets["mlflow"])
            for o in page.get("Contents", [])]
    client = mlflow_client(team_stack)
    for flow_run_id in runs:
        (run,) = client.search_runs([client.get_experiment_by_name(NAME).experiment_id],
                                    f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
        mine = [k for k in keys if f"/{run.info.run_id}/artifacts/" in k]
        assert any(k.endswith("/report/report.md") for k in mine), mine
        assert any("/report/plots/" in k and k.endswith(".png") for k in mine), mine
        assert any(k.endswith("/verdict.json") for k in mine), mine
    models = [k for k in keys if k.endswith("/MLmodel")]
    assert len(models) >= 2, keys
    assert any(k.endswith(".safetensors") for k in keys)
    # the worker's key (what people hold) is not the MLflow server's
    assert team_stack.client_env["AWS_ACCESS_KEY_ID"] != team_stack.team.s3_key("mlflow")[0]
    assert team_stack.team.s3_key("mlflow")[1] not in json.dumps(team_stack.client_env)


def test_runs_pushed_dvc_data_and_published_versions_to_the_buckets(team_stack, runs):
    """The worker's environment (infra/team.yaml client_env, not this test) makes every deployment
    run push its DVC outputs to the DVC bucket and publish its registered version to the models bucket."""
    import yaml

    s3 = team_stack.s3("worker")

    def keys(bucket: str, prefix: str = "") -> set[str]:
        return {o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
                for o in page.get("Contents", [])}

    dvc_keys = keys(team_stack.buckets["dvc"])
    for project, _ in runs.values():
        outs = [out for stage in yaml.safe_load((project / "dvc.lock").read_text())["stages"].values()
                for out in stage["outs"]]
        assert {o["path"] for o in outs} >= {"models/base", "data"}, outs
        for out in outs:  # DVC 3's remote layout: files/md5/<2 hex>/<rest>[.dir]
            md5 = out["md5"]
            assert f"files/md5/{md5[:2]}/{md5[2:]}" in dvc_keys, (out, sorted(dvc_keys)[:20])
    client = mlflow_client(team_stack)
    versions = client.search_model_versions(f"name = '{NAME}'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    models_bucket = team_stack.buckets["models"]
    for version in versions:
        uri = version.tags.get("s3_uri", "")
        assert uri.startswith(f"s3://{models_bucket}/"), (version.version, version.tags)
        published = keys(models_bucket, uri.removeprefix(f"s3://{models_bucket}/").rstrip("/") + "/")
        assert any(k.endswith("config.json") for k in published), (uri, published)
        assert any(k.endswith(".safetensors") for k in published), (uri, published)


def test_registry_aliases_challenger_and_champion(team_stack, runs):
    model = mlflow_client(team_stack).get_registered_model(NAME)
    assert set(model.aliases) >= {"champion", "challenger"}
    assert {str(v) for v in model.aliases.values()} <= {"1", "2"}


def team_processes(stack) -> list[psutil.Process]:
    """Every process whose command line or working directory is in the team folder or names its ports."""
    marks = [str(stack.home), *(f":{p}" for p in stack.ports.values()), *(f" {p}" for p in stack.ports.values())]
    found = []
    for proc in psutil.process_iter(["cmdline", "cwd", "status"]):
        if proc.pid == os.getpid() or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        text = " ".join(proc.info["cmdline"] or []) + " " + (proc.info["cwd"] or "")
        if any(m in text for m in marks):
            found.append(proc)
    return found


def test_down_stops_everything_and_up_loses_nothing(team_stack, runs):
    client = mlflow_client(team_stack)
    experiment = client.get_experiment_by_name(NAME).experiment_id
    before = {r.info.run_id: r.data.metrics for r in client.search_runs([experiment])}
    versions = sorted(v.version for v in client.search_model_versions(f"name = '{NAME}'"))
    aliases = client.get_registered_model(NAME).aliases
    pids = [row["pid"] for row in team_stack.status().values()]
    assert all(pids), team_stack.status()

    rows = team_stack.stop()
    assert {r["health"] for r in rows} == {"down"}
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert team_processes(team_stack) == []
    done = subprocess.run([sys.executable, "-m", "flows.cli", "team", "status", "--home", str(team_stack.home)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == 4 and "MLflow server" in done.stdout and "down" in done.stdout, done

    team_stack.start()
    print(f"team up again in {team_stack.up_seconds:.1f} s")
    assert {r["health"] for r in team_stack.status().values()} == {"healthy"}
    client = mlflow_client(team_stack)
    assert {r.info.run_id: r.data.metrics for r in client.search_runs([experiment])} == before
    assert sorted(v.version for v in client.search_model_versions(f"name = '{NAME}'")) == versions
    assert client.get_registered_model(NAME).aliases == aliases
    with prefect(team_stack) as prefect_client:
        for flow_run_id in runs:
            assert prefect_client.read_flow_run(flow_run_id).state.is_completed()
    (parent,) = client.search_runs([experiment], f"tags.`prefect.flow_run_id` = '{next(iter(runs))}'")
    text = Path(client.download_artifacts(parent.info.run_id, "verdict.json", str(team_stack.home / "check"))).read_text()
    assert "passed" in json.loads(text)  # the artifact came back through the server from the restored bucket


def test_mlflow_models_serve_the_champion_from_the_server(team_stack, runs, tmp_path):
    port, log = free_port(), tmp_path / "serve.log"
    bin_dir = str(Path(sys.executable).parent)  # `mlflow models serve` execs `uvicorn` from PATH
    # no bucket credentials: the model comes through the tracking server's artifact proxy
    env = {k: v for k, v in team_stack.env().items() if not k.startswith("AWS_")}
    env.update(MLFLOW_DISABLE_TELEMETRY="true", PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@champion", "--env-manager",
           "local", "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as out:
        server = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        def ready():
            if server.poll() is not None:
                pytest.fail(f"mlflow models serve exited with {server.returncode}:\n{tail(log)}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as response:
                    return response.status == 200
            except OSError:
                return False

        assert wait_for(ready, SERVE_S, 0.5), f"no answer within {SERVE_S} s:\n{tail(log)}"
        status, body = post(f"http://127.0.0.1:{port}/invocations",
                            {"inputs": ["def f(x):"], "params": {"max_new_tokens": 4}}, timeout=120)
        assert status == 200, body
        (answer,) = body["predictions"]
        assert isinstance(answer, str) and answer
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_cli_against_the_server_from_another_folder(team_stack, runs, tmp_path, monkeypatch, capsys):
    from flows.cli import main

    project = next(iter(runs.values()))[0]
    (tmp_path / "params.yaml").write_text((project / "params.yaml").read_text())  # the recipe names the model
    monkeypatch.chdir(tmp_path)
    for key in [k for k in os.environ if k.startswith(("MLFLOW_", "AWS_"))]:
        monkeypatch.delenv(key)
    for key, value in team_stack.member_login.items():  # what client.env gives a member's shell
        monkeypatch.setenv(key, value)
    uri = ["--tracking-uri", team_stack.mlflow_uri]
    client = mlflow_client(team_stack)
    experiment = client.get_experiment_by_name(NAME).experiment_id
    run_ids = [client.search_runs([experiment], f"tags.`prefect.flow_run_id` = '{flow_run_id}'")[0].info.run_id
               for flow_run_id in runs]

    assert main(["runs", *uri]) == 0
    table = capsys.readouterr().out
    assert all(r[:8] in table for r in run_ids), table
    assert main(["compare", *[r[:8] for r in run_ids], *uri]) == 0
    assert "stages.0.sparsity" in capsys.readouterr().out
    champion = int(client.get_registered_model(NAME).aliases["champion"])
    other = 3 - champion
    assert main(["promote", str(other), "--reason", "team e2e", *uri]) == 0
    assert client.get_registered_model(NAME).aliases["champion"] == str(other)
    assert main(["rollback", "--reason", "team e2e back", *uri]) == 0
    assert client.get_registered_model(NAME).aliases["champion"] == str(champion)
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


# --------------------------------------------------------------------------- seen in a browser
UI_ARTIFACTS = ROOT / "test-artifacts" / "team-ui"


def prefect_login(browser: Browser, prefect_ui: str, auth_string: str) -> str:
    """Log in through the Prefect UI's own login form (where its dashboard sends a browser without a
    login); the text of the page it lands on."""
    import json

    page = browser.open(f"{prefect_ui}/dashboard", until=lambda t: "Login" in t, timeout=60)
    assert "/login" in browser.evaluate("location.href"), page[:2000]  # asked to log in first
    browser.evaluate("(() => { const i = document.querySelector('form input'); i.value = %s; "
                     "i.dispatchEvent(new Event('input', {bubbles: true})); "
                     "i.closest('form').requestSubmit(); })()" % json.dumps(auth_string))
    page = browser.wait(lambda t: "Login" not in t[:200] and "Dashboard" in t, 60)
    assert "/login" not in browser.evaluate("location.href"), page[:2000]  # the login form let us in
    return page


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: `make browser` installs Debian's chromium "
                    "(apt-get, as root); `make test` does so first when it can")
def test_team_uis_ask_for_a_login_and_show_the_runs_and_the_deployment(team_stack, runs, tmp_path):
    UI_ARTIFACTS.mkdir(parents=True, exist_ok=True)
    client = mlflow_client(team_stack)
    experiment = client.get_experiment_by_name(NAME)
    names = [r.info.run_name for r in client.search_runs([experiment.experiment_id], "tags.`prefect.flow_run_id` != ''")]
    runs_url = f"{team_stack.mlflow_uri}/#/experiments/{experiment.experiment_id}/runs"
    host = team_stack.mlflow_uri.split("/")[2]
    with Browser(tmp_path / "anonymous") as browser:  # nobody logged in: refused, nothing shown
        page = browser.open(runs_url, until=lambda t: "not authenticated" in t, timeout=60)
        assert browser.auth_asked and "not authenticated" in page and not any(n in page for n in names), page[:2000]
    with Browser(tmp_path / "reader") as browser:  # the read-only account browses
        user, password = team_stack.team.mlflow_accounts["reader"]
        browser.basic_auth(host, user, password)
        page = browser.open(runs_url, until=lambda t: all(n in t for n in names), timeout=90)
        browser.screenshot(UI_ARTIFACTS / "mlflow-team-runs.png")
        assert "Run Name" in page and all(n in page for n in names), page[:2000]

    flow_run_id, (_, run) = next(iter(runs.items()))
    with prefect(team_stack) as prefect_client:
        deployment = prefect_client.read_deployment_by_name("frugalflow-nightly/nightly")
    prefect_ui = team_stack.prefect_api.removesuffix("/api")
    with Browser(tmp_path / "prefect") as browser:
        prefect_login(browser, prefect_ui, team_stack.team.prefect_auth)
        page = browser.open(f"{prefect_ui}/runs/flow-run/{flow_run_id}",
                            until=lambda t: run.name in t and "Completed" in t and "nightly" in t, timeout=60)
        browser.screenshot(UI_ARTIFACTS / "prefect-flow-run.png")
        assert run.name in page and "Completed" in page and "nightly" in page, page[:2000]
        page = browser.open(f"{prefect_ui}/deployments/deployment/{deployment.id}",
                            until=lambda t: "gpu" in t and ("At 02:00 AM" in t or "0 2 * * *" in t), timeout=60)
        browser.screenshot(UI_ARTIFACTS / "prefect-deployment.png")
        assert "nightly" in page and "gpu" in page, page[:2000]
        assert "At 02:00 AM" in page or "0 2 * * *" in page, page[:3000]  # the cron of infra/prefect.yaml
