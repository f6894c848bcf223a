"""Racing promotions: N processes register a candidate each and promote it at the same moment,
against a real MLflow tracking server (lock: a Prefect global concurrency limit on a real Prefect
server) and against a SQLite store (lock: a file lock). Afterwards `champion` is the best
candidate, the champion history (`tasks/registry.py` `history`) holds every move in order, and every candidate has exactly one
version. The racer processes run this file as a script."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

N_RACERS = 6
OBJECTIVE = "ppl"


def racer(uri: str, model: str, ppl: float, go: Path, out: Path) -> None:
    """One contender: a run with `candidate.ppl`, then (at the go signal) register + promote."""
    from tasks import registry as R
    from tasks import tracking as T

    client = T.connect(uri)
    exp = T.experiment_id(client, f"race-{model}", go.parent / "mlartifacts")
    run_id = T.start_run(client, exp, f"candidate-{ppl}")
    T.log_metrics(client, run_id, {f"candidate.{OBJECTIVE}": ppl, "candidate.size_mb": 1.0})
    source = f"{client.get_run(run_id).info.artifact_uri}/model"
    (go.parent / f"ready-{os.getpid()}").touch()
    while not go.exists():
        time.sleep(0.01)
    version = R.register_candidate(client, model, run_id, source, {"verdict": "pass"})
    decision = R.promote_if_better(client, model, version, OBJECTIVE)
    out.write_text(json.dumps({"run_id": run_id, "ppl": ppl, "version": version, **decision}))


def race(uri: str, model: str, workdir: Path, env: dict) -> list[dict]:
    """Start N racers, release them together once all are ready; their results."""
    workdir.mkdir(parents=True, exist_ok=True)
    values = [round(10 + i * 0.5, 2) for i in range(N_RACERS)]
    random.Random(7).shuffle(values)
    go, procs = workdir / "go", []
    for i, ppl in enumerate(values):
        procs.append(subprocess.Popen([sys.executable, __file__, uri, model, str(ppl), str(go),
                                       str(workdir / f"out-{i}.json")], env=env, stderr=subprocess.PIPE,
                                      text=True, start_new_session=True))
    try:
        deadline = time.monotonic() + 180
        while len(list(workdir.glob("ready-*"))) < N_RACERS:
            failed = [p for p in procs if p.poll() not in (None, 0)]
            assert not failed, failed[0].stderr.read()[-3000:]
            assert time.monotonic() < deadline, "racers not ready within 180 s"
            time.sleep(0.1)
        go.touch()
        for p in procs:
            _, err = p.communicate(timeout=240)
            assert p.returncode == 0, err[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [json.loads((workdir / f"out-{i}.json").read_text()) for i in range(N_RACERS)]


def check_registry(uri: str, model: str, results: list[dict]) -> None:
    from mlflow import MlflowClient

    from tasks import registry as R

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = client.search_model_versions(f"name = '{model}'")
    # no version lost or duplicated: one per racer, numbered 1..N, one per run
    assert sorted(int(v.version) for v in versions) == list(range(1, N_RACERS + 1))
    assert sorted(v.run_id for v in versions) == sorted(r["run_id"] for r in results)
    ppl_of = {str(v.version): client.get_run(v.run_id).data.metrics[f"candidate.{OBJECTIVE}"] for v in versions}
    best = min(ppl_of, key=ppl_of.get)
    assert str(client.get_model_version_by_alias(model, "champion").version) == best
    # every move recorded, in order: each one from the champion before it, each one an improvement
    moves = R.history(client, model)
    assert moves and moves[0]["previous"] is None and moves[-1]["version"] == best
    for before, after in zip(moves, moves[1:]):
        assert after["previous"] == before["version"], moves
        assert ppl_of[after["version"]] < ppl_of[before["version"]], moves
    promoted = [r["version"] for r in results if r["promoted"]]
    assert sorted(promoted) == sorted(m["version"] for m in moves)  # a move per promotion, none lost
    for r in results:  # whoever was not promoted lost to a champion at least as good
        assert r["promoted"] or ppl_of[r["champion"]] <= r["ppl"], r


def test_which_lock(tmp_path, caplog):
    """SQLite store: a file lock, even with a Prefect API set (no server is asked); a tracking server
    without a Prefect API: a host-local file lock, with a warning."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.promotion_lock import promotion_lock

    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):  # nothing listens there
        with promotion_lock(f"sqlite:///{tmp_path / 'mlflow.db'}", "m") as kind:
            assert kind == "file"
    with temporary_settings(updates={PREFECT_API_URL: None}), caplog.at_level("WARNING"):
        with promotion_lock("http://127.0.0.1:9", "m") as kind:
            assert kind == "file"
    assert "kept apart on this host only" in caplog.text


@pytest.mark.slow
def test_racing_promotions_on_sqlite_store_file_lock(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    from tasks import tracking as T

    T.connect(uri)  # create the schema once, before the racers open the file
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    results = race(uri, "race-sqlite", tmp_path / "race", env)
    check_registry(uri, "race-sqlite", results)


@pytest.mark.slow
def test_racing_promotions_on_tracking_server_prefect_lock(team_stack, tmp_path):
    from tasks.promotion_lock import limit_name

    model = f"race-server-{os.getpid()}-{int(time.time())}"
    env = {**os.environ, "PREFECT_API_URL": team_stack.prefect_api}
    env.pop("MLFLOW_TRACKING_URI", None)
    results = race(team_stack.mlflow_uri, model, tmp_path / "race", env)
    check_registry(team_stack.mlflow_uri, model, results)
    # the lock was the Prefect limit named after the model, and nothing holds it now
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: team_stack.prefect_api}), get_client(sync_client=True) as c:
        limit = c.read_global_concurrency_limit_by_name(limit_name(model))
    assert limit.limit == 1 and limit.active_slots == 0


if __name__ == "__main__":
    racer(sys.argv[1], sys.argv[2], float(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5]))
