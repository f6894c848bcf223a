"""The GPU slot (tasks/gpu_slot.py) for real: on the embedded default it holds nothing and asks no
server; against the team's Prefect server it holds the global concurrency limit; and two
deployment runs of the nightly flow, picked up at once by the team's worker, run side by side while
their heavy parts (every stage and evaluation) take turns on the one slot, as the wall-clock
start/end of every hold in their Prefect logs shows."""
from __future__ import annotations

import re

import pytest
import yaml
from helpers import wait_for
from team_stack import NIGHTLY_MODEL, nightly_runs

from tasks import gpu_slot as G

HOLD = re.compile(r"gpu slot '(?P<name>[^']+)' held: (?P<label>.+) from (?P<start>[\d.]+) to (?P<end>[\d.]+)")
HOLD_LOGS_S = 30


def prefect(stack):
    return stack.prefect()


@pytest.fixture
def team_api(team_stack, monkeypatch):
    """This process's Prefect settings pointed at the team's server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv(G.LIMIT_ENV, raising=False)
    with temporary_settings(updates={PREFECT_API_URL: team_stack.prefect_api}):
        yield team_stack


def test_embedded_default_holds_nothing_and_asks_no_server(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    def no_server(name):
        raise AssertionError("the embedded default must not ask a Prefect server for a limit")

    monkeypatch.setattr(G, "limit_exists", no_server)
    monkeypatch.delenv(G.LIMIT_ENV, raising=False)
    recorded = []
    with temporary_settings(updates={PREFECT_API_URL: None}):
        assert G.api_url() is None
        with G.gpu_slot("work", record=recorded.append) as hold:
            pass
    assert hold.name == "gpu" and not hold.held and hold.requested <= hold.start <= hold.end
    assert recorded == [hold] and set(hold.metrics()) == {"gpu_slot.start", "gpu_slot.end", "gpu_slot.wait_s"}
    monkeypatch.setenv(G.LIMIT_ENV, "card-0")
    assert G.limit_name() == "card-0"


def test_team_server_slot_is_held_and_released(team_api):
    from prefect.client.orchestration import get_client

    with G.gpu_slot("no limit of that name", name="no-such-limit") as hold:
        pass
    assert not hold.held  # a server without the limit: nothing held, nothing waits
    with get_client(sync_client=True) as client:
        with G.gpu_slot("held") as hold:
            during = client.read_global_concurrency_limit_by_name(team_api.gpu_limit)
        after = client.read_global_concurrency_limit_by_name(team_api.gpu_limit)
    assert hold.held and hold.name == team_api.gpu_limit == "gpu"
    assert during.limit == 1 and during.active_slots == 1 and after.active_slots == 0


def holds_in_logs(client, flow_run_id) -> list[dict]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    found, offset = [], 0
    while True:
        page = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200,
                                offset=offset)
        for log in page:
            if m := HOLD.search(log.message):
                found.append({"run": str(flow_run_id), "label": m["label"], "name": m["name"],
                              "start": float(m["start"]), "end": float(m["end"])})
        if len(page) < 200:
            return found
        offset += 200


@pytest.mark.slow
def test_two_deployment_runs_take_turns_on_the_slot(team_stack, tiny_model_dir):
    with prefect(team_stack) as client:
        assert client.read_global_concurrency_limit_by_name(team_stack.gpu_limit).limit == 1
        # the team's nightly deployment (infra/prefect.yaml) has no deployment-level limit: only the
        # GPU slot keeps two of its runs apart
        deployment = client.read_deployment_by_name("frugalflow-nightly/nightly")
        assert deployment.concurrency_limit is None and deployment.work_pool_name == team_stack.work_pool
    # the session's two deployment runs, triggered at once (tests/team_stack.py; completed, or it fails)
    done = nightly_runs(team_stack, tiny_model_dir)
    ids = list(done)
    runs = [run for _, run in done.values()]
    with prefect(team_stack) as client:
        holds = wait_for(lambda: (found := [h for i in ids for h in holds_in_logs(client, i)])
                         and all(any(h["run"] == i and h["label"] == "evaluate candidate" for h in found) for i in ids)
                         and found, HOLD_LOGS_S, 1)  # logs are shipped in batches
        holds = holds or [h for i in ids for h in holds_in_logs(client, i)]
    stages = [s["method"] for s in yaml.safe_load((next(iter(done.values()))[0] / "params.yaml").read_text())["stages"]]
    stage_labels = {f"stage {i} {method}" for i, method in enumerate(stages)}

    # the two flow runs were in flight at the same time ...
    assert max(r.start_time for r in runs) < min(r.end_time for r in runs), [(r.start_time, r.end_time) for r in runs]
    # ... each held the slot for its baseline, its stage and its candidate evaluation ...
    for i in ids:
        labels = {h["label"] for h in holds if h["run"] == str(i)}
        assert {"evaluate base model", "evaluate candidate"} | stage_labels <= labels, labels
    assert {h["name"] for h in holds} == {team_stack.gpu_limit}
    # ... and no two holds overlapped
    holds.sort(key=lambda h: h["start"])
    timeline = "\n".join(f"{h['start']:.3f}-{h['end']:.3f} {h['run'][:8]} {h['label']}" for h in holds)
    print("gpu slot timeline:\n" + timeline)
    for before, after in zip(holds, holds[1:]):
        assert before["end"] <= after["start"], timeline
    # the stage's hold is also on its MLflow run (metrics gpu_slot.start / .end / .wait_s)
    from mlflow import MlflowClient

    mlflow = MlflowClient(tracking_uri=team_stack.mlflow_uri)
    experiment = mlflow.get_experiment_by_name(NIGHTLY_MODEL).experiment_id
    stage_runs = mlflow.search_runs([experiment], "metrics.`gpu_slot.start` > 0")
    recorded = sorted((r.data.metrics["gpu_slot.start"], r.data.metrics["gpu_slot.end"]) for r in stage_runs)
    logged = sorted((h["start"], h["end"]) for h in holds if h["label"] in stage_labels)
    assert len(recorded) == len(logged) == 2 * len(stages)  # every stage of both runs
    for (start, end), (log_start, log_end) in zip(recorded, logged):
        assert start == pytest.approx(log_start, abs=2e-3) and end == pytest.approx(log_end, abs=2e-3)
