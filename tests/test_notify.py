"""Notifications (issue #40 item 3): the real nightly flow on the tiny model, under Prefect's test
harness, with a real HTTP receiver on loopback as the recipe's webhook and the default file
destination (artifacts/notifications.jsonl).

A night whose candidate fails its gates sends one message naming the failed gate; a night that raises
sends one "failed" message with its MLflow run and the error's first line (also when it fails on its
own recipe, before any MLflow run); a passing or unchanged night sends nothing; a webhook that does
not answer leaves the night's result as it was and is a warning naming it. A new champion larger than
the one it replaced sends `champion_regressed` naming the metric, both values and both versions; a
night whose process died without closing its runs is reported (`crashed`) by the next night."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import ROOT, client_for, free_port, make_project, run_flow, store_uri, tiny_recipe

MODEL = "tiny-notify"
SECONDS: dict[str, float] = {}


class Receiver:
    """An HTTP server on loopback that keeps every POSTed JSON body."""

    def __init__(self):
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                received.append({"path": self.path, "json": json.loads(body)})
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/night"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def take(self) -> list[dict]:
        taken, self.received[:] = list(self.received), []
        return taken

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir) -> Path:
    recipe = tiny_recipe(tiny_model_dir, MODEL, evaluation={"decode_race_rounds": 0})
    return make_project(tmp_path_factory.mktemp("project"), recipe)


@pytest.fixture(scope="module")
def nights(prefect_harness, project):
    yield
    print("\nseconds per night: " + ", ".join(f"{k} {v}" for k, v in SECONDS.items()))


def night(project: Path, name: str, overrides: list[str]) -> dict:
    started = time.monotonic()
    try:
        return run_flow(project, overrides)
    finally:
        SECONDS[name] = round(time.monotonic() - started, 1)


def file_lines(project: Path) -> list[dict]:
    path = project / "artifacts" / "notifications.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_passing_night_and_an_unchanged_one_send_nothing(nights, project, receiver):
    hook = [f"notify.webhook_url={receiver.url}"]
    passed = night(project, "passing", hook)
    assert passed["verdict"]["passed"] and passed["promotion"]["champion"]
    again = night(project, "unchanged", hook)
    assert again["unchanged"] is not None
    assert receiver.take() == [] and file_lines(project) == []


def test_gates_failed_sends_one_message_naming_the_gate(nights, project, receiver):
    result = night(project, "gates failed", [f"notify.webhook_url={receiver.url}", "gates.max_ppl=0.5"])
    assert not result["verdict"]["passed"]
    [got] = receiver.take()
    message = got["json"]
    assert got["path"] == "/hooks/night" and message["event"] == "gates_failed"
    [reason] = result["verdict"]["reasons"]  # the absolute ppl gate, as the verdict names it
    assert reason.startswith("ppl = ") and reason.endswith("fails <= 0.5")
    assert message["subject"] == f"frugalflow {MODEL}: candidate failed its gates: {reason}"
    assert f"MLflow run: {result['run_id']}" in message["body"]
    assert all(reason in message["body"] for reason in result["verdict"]["reasons"])
    assert message["text"] == f"{message['subject']}\n{message['body']}"
    # the default file destination got the same message
    [line] = file_lines(project)
    assert (line["event"], line["subject"], line["body"]) == ("gates_failed", message["subject"], message["body"])


def test_a_night_that_raises_sends_one_failed_message(nights, project, receiver, monkeypatch):
    def broken_stage(*args, **kwargs):
        raise RuntimeError("stage exploded: out of memory\nthe rest of a long traceback")

    monkeypatch.setattr("flows.nightly.run_stages", broken_stage)
    before = len(file_lines(project))
    with pytest.raises(RuntimeError, match="stage exploded"):
        night(project, "failed", [f"notify.webhook_url={receiver.url}", "stages.0.sparsity=0.25"])
    [got] = receiver.take()
    message = got["json"]
    assert message["event"] == "failed" and message["subject"].startswith(f"frugalflow {MODEL}: night failed")
    assert "error: RuntimeError: stage exploded: out of memory" in message["body"]
    assert "the rest of a long traceback" not in message["body"] + message["subject"]
    run_id = message["body"].split("MLflow run: ")[1].split()[0]
    run = client_for(project).get_run(run_id)  # the night's own run, closed FAILED
    assert run.info.status == "FAILED" and "stage exploded" in run.data.tags["frugalflow.failure"]
    assert len(file_lines(project)) == before + 1


def test_a_night_that_fails_on_its_recipe_still_notifies(nights, project, receiver):
    """No recipe, so no MLflow run: the notify section alone says where to send."""
    with pytest.raises(Exception, match="gates.max_ppl"):
        night(project, "bad recipe", [f"notify.webhook_url={receiver.url}", "gates.max_ppl=-1"])
    [got] = receiver.take()
    body = got["json"]["body"]
    assert got["json"]["event"] == "failed" and "MLflow run: none (the night failed before starting one" in body
    assert "gates.max_ppl" in body and "error: RecipeError" in body


def test_an_undeliverable_webhook_does_not_fail_the_night(nights, project, receiver, caplog, tmp_path):
    closed = free_port()  # nothing listens there
    secret_url = f"http://team:hunter2@127.0.0.1:{closed}/token-in-the-path"
    before = len(file_lines(project))
    with caplog.at_level(logging.WARNING):
        result = night(project, "webhook down", [f"notify.webhook_url={secret_url}", "gates.max_ppl=0.5"])
    assert not result["verdict"]["passed"] and result["run_id"]
    assert len(file_lines(project)) == before + 1  # the other destination still got it
    warnings = [r.getMessage() for r in caplog.records if "not delivered" in r.getMessage()]
    assert len(warnings) == 1 and f"webhook http://127.0.0.1:{closed}" in warnings[0], warnings
    assert "hunter2" not in caplog.text and "token-in-the-path" not in caplog.text
    # the URL is a secret of the recipe: not in the run's params or its recipe.yaml
    client = client_for(project)
    assert client.get_run(result["run_id"]).data.params["notify.webhook_url"] == "**********"
    recipe_yaml = Path(client.download_artifacts(result["run_id"], "recipe.yaml", str(tmp_path))).read_text()
    assert "token-in-the-path" not in recipe_yaml and "hunter2" not in recipe_yaml


def test_a_new_champion_worse_than_the_old_one_sends_champion_regressed(nights, project, receiver):
    """8-bit weights: a lower perplexity (the objective, so it is promoted) and a larger model than version 1."""
    result = night(project, "regressed champion", [f"notify.webhook_url={receiver.url}", "stages.1.bits=8"])
    promotion = result["promotion"]
    assert result["verdict"]["passed"] and promotion["champion"] and promotion["version"] == "2"
    client = client_for(project)
    old_run = client.get_model_version(MODEL, "1").run_id
    old = client.get_run(old_run).data.metrics["candidate.size_mb"]
    new = client.get_run(result["run_id"]).data.metrics["candidate.size_mb"]
    assert new > old * 1.02
    [found] = promotion["replaced"]["regressions"]  # ppl improved; no race in this recipe, so no speed-up
    assert (found["metric"], found["old"], found["new"]) == ("size_mb", old, new)
    [got] = receiver.take()
    message = got["json"]
    first = f"version 2 replaced version 1: size_mb {old:.4g} -> {new:.4g} ({(new / old - 1) * 100:+.1f}% worse; tolerance 2%)"
    assert message["event"] == "champion_regressed"
    assert message["subject"] == f"frugalflow {MODEL}: new champion regressed: {first}"
    assert f"previous champion: version 1 (run {old_run})" in message["body"]
    assert f"new champion: version 2 (run {result['run_id']})" in message["body"]
    assert "promoted for: ppl" in message["body"] and "different data" not in message["body"]
    assert client.get_run(result["run_id"]).data.tags["frugalflow.champion_regressed"].startswith("size_mb ")
    assert file_lines(project)[-1]["event"] == "champion_regressed"


KILLED_NIGHT = """
import os, sys
from mlflow import MlflowClient
from tasks.runstate import process_tags
client = MlflowClient(sys.argv[1])
experiment = client.get_experiment_by_name(sys.argv[2]).experiment_id
run = client.create_run(experiment, run_name="killed-night", tags={**process_tags(), "frugalflow.recipe": sys.argv[2],
                                                                 "prefect.flow_run_id": "flow-run-of-the-killed-night"})
client.create_run(experiment, run_name="its-stage", tags={**process_tags(), "mlflow.parentRunId": run.info.run_id})
print(run.info.run_id, flush=True)
os._exit(9)  # dies with both runs open, as under SIGKILL: no hook, no cleanup
"""


def test_a_killed_night_is_reported_by_the_next_one(nights, project, receiver):
    died = subprocess.run([sys.executable, "-c", KILLED_NIGHT, store_uri(project), MODEL], cwd=ROOT,
                          capture_output=True, text=True)
    assert died.returncode == 9, died.stderr
    killed = died.stdout.split()[-1]
    assert client_for(project).get_run(killed).info.status == "RUNNING"
    result = night(project, "after a killed one", [f"notify.webhook_url={receiver.url}", "stages.1.bits=8"])
    assert result["unchanged"] is not None  # same inputs as version 2: the night itself has nothing to say
    [got] = receiver.take()  # one message: the night's run, not its stage's
    message = got["json"]
    assert message["event"] == "crashed" and message["subject"].startswith(f"frugalflow {MODEL}: a night was killed")
    assert f"MLflow run: {killed}" in message["body"] and "Prefect flow run: flow-run-of-the-killed-night" in message["body"]
    run = client_for(project).get_run(killed)
    assert run.info.status == "FAILED"
    assert f"closed: {run.data.tags['frugalflow.failure']}" in message["body"] and "killed: its process" in message["body"]
    assert "killed night: killed-night, started " in message["body"]


def test_events_and_links(tmp_path):
    """Only the events the recipe lists are sent; a tracking server's run link has no password."""
    from frugalflow.config import NotifyConfig
    from tasks import notify as N

    config = NotifyConfig(file="out.jsonl", events=["failed"])
    assert N.send(config, tmp_path, "gates_failed", "s", "b") == []
    assert N.send(config, tmp_path, "failed", "s", "b") == [f"file {tmp_path / 'out.jsonl'}"]
    assert N.run_link("https://u:pw@mlflow.example:5000/", "3", "abc") == \
        "https://u:***@mlflow.example:5000/#/experiments/3/runs/abc"
    assert N.run_link("sqlite:///mlflow.db", "3", "abc") is None


@pytest.mark.parametrize("override, words", [
    ("notify.events=[failed,regressed]", ["notify.events.1", "'champion_regressed' or 'crashed'", "regressed"]),
    ("notify.on=[failed]", ["notify.on", "unknown key"]),
    ("notify.webhook_url=ftp://example/x", ["notify.webhook_url", "http:// or https://"]),
])
def test_validate_refuses_a_bad_notify_section(override, words, capsys):
    from flows.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["validate", str(Path(__file__).parents[1] / "params.yaml"), "-s", override])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and all(w in err for w in words), err
