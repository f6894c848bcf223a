"""Overrides carrying a secret stay out of the flow's Prefect parameters (flows/secret_overrides.py)
and still reach the recipe the flow loads; the team canary run (tests/test_team_secrets.py) checks
that nothing of them reaches Prefect's database, MLflow or S3."""
from __future__ import annotations

from flows import secret_overrides as S


def test_overrides_naming_or_holding_a_secret_are_held_back_and_restored(monkeypatch):
    monkeypatch.delenv(S.ENV, raising=False)
    given = ["stages.0.sparsity=0.3", "tracking.uri=http://frugalflow:hunter2-canary@127.0.0.1:5000",
             "notify.webhook_url=https://hooks.example/T0/abc", "notify.events=[failed]", "sweep.api_token=x"]
    recorded = S.split(given)
    assert recorded == ["stages.0.sparsity=0.3", "notify.events=[failed]"]
    assert "hunter2-canary" not in " ".join(recorded)
    assert S.restore(recorded) == ["stages.0.sparsity=0.3", "notify.events=[failed]", given[1], given[2], given[4]]
    assert S.restore(S.restore(recorded)) == S.restore(recorded)  # restoring twice adds nothing
    assert S.split(["stages.0.sparsity=0.3"]) == ["stages.0.sparsity=0.3"] and S.restore([]) == []  # a new run forgets


def test_a_plain_url_is_not_a_secret():
    assert not S.is_secret("tracking.uri=http://127.0.0.1:5000")
    assert S.is_secret("tracking.uri=postgresql://u:p@db/mlflow")
