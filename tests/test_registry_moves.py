"""The champion's moves by hand: promoting the champion records nothing, rollback always reaches the
previous different champion (even past self-moves older releases recorded), and runs, compare,
promote and rollback work from any folder given the store and the model name."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT

from tasks import registry as R
from tasks import tracking as T

MODEL = "moves"


@pytest.fixture
def store(tmp_path):
    """A SQLite store with three registered versions of MODEL, each from a run with candidate metrics."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = T.connect(uri)
    exp = T.experiment_id(client, "moves", tmp_path / "mlartifacts")
    for ppl in (12.0, 11.0, 10.0):
        run_id = T.start_run(client, exp, f"c{ppl}", tags={"frugalflow.recipe": "moves"})
        T.log_metrics(client, run_id, {"candidate.ppl": ppl, "candidate.size_mb": 1.0,
                                       "baseline.ppl": 10.0, "baseline.ppl.french": 30.0,
                                       "candidate.ppl.french": ppl * 3})
        R.register_candidate(client, MODEL, run_id, f"{client.get_run(run_id).info.artifact_uri}/model", {})
    return uri, client


def test_promoting_the_champion_records_nothing_and_rollback_skips_self_moves(store):
    _, client = store
    R.promote(client, MODEL, "1", "first")
    R.promote(client, MODEL, "2", "better")
    again = R.promote(client, MODEL, "2", "again")
    assert again["previous"] == again["version"] == "2" and again["at"] is None
    assert [(e["previous"], e["version"]) for e in R.history(client, MODEL)] == [(None, "1"), ("1", "2")]
    # a history an older release wrote (one tag holding the list), with a 2 -> 2 move last
    moves = R.history(client, MODEL) + [{"version": "2", "previous": "2", "at": "x", "reason": "r", "by": "flow"}]
    for key in [k for k in client.get_registered_model(MODEL).tags if k.startswith(R.HISTORY_PREFIX)]:
        client.delete_registered_model_tag(MODEL, key)
    client.set_registered_model_tag(MODEL, R.HISTORY_TAG, json.dumps(moves))
    assert R.history(client, MODEL) == moves
    entry = R.rollback(client, MODEL, "regression")
    assert (entry["previous"], entry["version"]) == ("2", "1")
    assert client.get_model_version_by_alias(MODEL, "champion").version == 1


def test_history_keeps_every_move_and_ends_at_the_alias(store):
    """No length limit (60 moves with long reasons: far past the 25 moves and 5000 characters one tag
    held), and a champion moved without its record (a promotion killed between the alias and the
    history, or a move outside frugalflow) is recorded before the next move, so rollback reaches it."""
    _, client = store
    for i in range(60):
        R.promote(client, MODEL, str(1 + i % 2), f"move {i}: " + "x" * 300)
    moves = R.history(client, MODEL)
    assert len(moves) == 60 and [m["reason"][:8] for m in moves[:2]] == ["move 0: ", "move 1: "]
    assert moves[-1]["version"] == client.get_model_version_by_alias(MODEL, "champion").version.__str__() == "2"
    client.set_registered_model_alias(MODEL, "champion", "1")  # behind frugalflow's back
    R.promote(client, MODEL, "2", "after the stray move")
    moves = R.history(client, MODEL)
    assert [(m["previous"], m["version"], m["by"]) for m in moves[-2:]] == [("2", "1", "reconcile"), ("1", "2", "flow")]
    assert R.rollback(client, MODEL, "back")["version"] == "1"
    assert R.history(client, MODEL)[-1]["version"] == "1"


def test_commands_from_any_folder_with_the_store_and_model(store, tmp_path):
    uri, client = store
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(ROOT)

    def cli(*args, **extra):
        return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True,
                              cwd=elsewhere, env={**env, **extra}, timeout=300)

    out = cli("promote", "3", "--reason", "by hand", "--tracking-uri", uri, "--model", MODEL)
    assert out.returncode == 0, out.stderr
    assert client.get_model_version_by_alias(MODEL, "champion").version == 3
    out = cli("promote", "3", "--reason", "twice", "--tracking-uri", uri, "--model", MODEL)
    assert out.returncode == 0 and "already; nothing moved" in out.stdout, out.stdout + out.stderr
    table = cli("runs", "--model", MODEL, MLFLOW_TRACKING_URI=uri)  # the store from the environment
    assert table.returncode == 0, table.stderr
    header = table.stdout.splitlines()[0]
    assert "eval %" in header and "french %" in header and table.stdout.count(" moves ") == 3
    out = cli("rollback", "--reason", "bad", "--tracking-uri", uri, "--model", MODEL)
    assert out.returncode == 2  # no earlier champion: only 3 was ever champion
    assert "no earlier champion" in out.stderr
    # without the model name and without a recipe: exit 2 naming what to give
    out = cli("runs", "--tracking-uri", uri)
    assert out.returncode == 2 and "--model NAME" in out.stderr and "params.yaml" in out.stderr
