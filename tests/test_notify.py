"""Notifications (issue #40 item 3): the real nightly flow on the tiny model, under Prefect's test
harness, with a real HTTP receiver on loopback as the recipe's webhook and the default file
destination (artifacts/notifications.jsonl).

A night whose candidate fails its gates sends one message naming the failed gate; a night that raises
sends one "failed" message with its MLflow run and the error's first line (also when it fails on its
own recipe, before any MLflow run); a passing or unchanged night sends nothing; a webhook that does
not answer leaves the night's result as it was and is a warning naming it."""
from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import client_for, free_port, make_project, run_flow, tiny_recipe

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
    ("notify.events=[failed,regressed]", ["notify.events.1", "'failed' or 'gates_failed'", "regressed"]),
    ("notify.on=[failed]", ["notify.on", "unknown key"]),
    ("notify.webhook_url=ftp://example/x", ["notify.webhook_url", "http:// or https://"]),
])
def test_validate_refuses_a_bad_notify_section(override, words, capsys):
    from flows.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["validate", str(Path(__file__).parents[1] / "params.yaml"), "-s", override])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and all(w in err for w in words), err
